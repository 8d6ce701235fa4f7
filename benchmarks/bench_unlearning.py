"""Unlearning through the whole guard: does a flagged question lose its knowledge, and nothing else?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_unlearning.py [--threads 1] [--dtype bfloat16] [--skip-tofu]

Two parts. (a) tofu_mini (``tofu_mini/run.py --guard --learned``): a model fine-tuned on invented authors,
where the forget set is known; full / retain / gradient ascent / gradient difference / ECO at a fixed sigma /
ECO with the corruption ``eco-guard optimize`` learned (best per selection mode), with TOFU's metrics under
both scorings. Its models are fine-tuned on first use (about 30 min on 2 idle cores, cached in
``tofu_mini/cache/``), and the learned store (``tofu_mini/eco_learned.eco.json``) ships with the benchmark.
Writes ``tofu_mini/results/``. (b) The embedded demo guard, below.

The embedded demo guard (SmolLM2-135M-Instruct forgets Harry Potter) answers questions nobody tuned a
corruption on: the dev Harry Potter questions (``benchmarks/data/topics/harry_potter/qa.jsonl``) and the
retain questions (``benchmarks/data/retain/qa.jsonl``). Each question goes through ``Guard.plan``:
routing, token selection and corruption as served. Of the questions the plain model answers right:

- forget: share still answered right under the guard (target <= 10%);
- retain: share still answered right (target >= 98%);
- fluency: perplexity of the guarded replies under the plain model, read as text (``eco_guard.optimize``:
  after a neutral request), over that of the plain replies (target: within 1/2 to 2; 1 reads as natural,
  below reads more predictable than the model's own answers: templates and loops).

The demo config's learned corruption (its store, ``eco_guard/data/default.eco.json``), the hand-set sigma 7 it
replaced, zero_out_top_k on 1 dim, and the paper's fixed choices (rand_noise_first_n, dims 1, sigma 100 and
1e6). Writes ``benchmarks/results/unlearning.{json,md,png}`` (``unlearning-<dtype>.*`` with ``--dtype``:
the same guard with its model weights in another precision).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from eco_guard.config import CorruptionSpec, SelectionConfig, load_config  # noqa: E402
from eco_guard.guard import Guard  # noqa: E402
from eco_guard.optimize import KnowledgeObjective, read_qa  # noqa: E402

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data"
OUT = ROOT / "results"
TOPIC = "harry_potter"
TARGETS = {"forget_kept": 0.10, "retain_kept": 0.98, "fluency": 2.0}


def variants(guard: Guard) -> dict[str, tuple[CorruptionSpec, SelectionConfig]]:
    demo, selection = guard.corruption_of(TOPIC)
    content = SelectionConfig(mode="content")
    return {
        f"demo config, learned ({demo.method}, dims {demo.dims}, {selection.mode})": (demo, selection),
        "hand-set rand_noise_first_n dims 1, sigma 7 (content)": (CorruptionSpec(strength=7.0), content),
        "zero_out_top_k dims 1 (content)": (CorruptionSpec(method="zero_out_top_k", dims=1), content),
        "paper sigma 100 (content)": (CorruptionSpec(strength=100.0), content),
        "paper sigma 1e6 (content)": (CorruptionSpec(strength=1e6), content),
    }


def run(max_new_tokens: int, dtype: str | None = None, batch_invariant: bool = False) -> dict:
    cfg = load_config(None)
    if dtype or batch_invariant:
        update = {"dtype": dtype or cfg.model.dtype, "batch_invariant": batch_invariant}
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=update)})
    guard = Guard.from_config(cfg)
    forget_items = read_qa(DATA / "topics" / TOPIC / "qa.jsonl")
    forget = KnowledgeObjective(guard, TOPIC, forget_items, max_new_tokens=max_new_tokens)
    retain = KnowledgeObjective(guard, TOPIC, read_qa(DATA / "retain" / "qa.jsonl"), max_new_tokens=max_new_tokens)
    rows = []
    for name, (spec, selection) in variants(guard).items():
        started = time.perf_counter()
        f, r = forget.measure(spec, selection), retain.measure(spec, selection)
        rows.append({"variant": name, "forget_kept": f.hit_rate, "forget_corrupted": f.corrupted,
                     "forget_fluency": f.fluency_ratio, "forget_repetition": f.repetition,
                     "retain_kept": r.hit_rate, "retain_corrupted": r.corrupted, "retain_fluency": r.fluency_ratio,
                     "seconds": round(time.perf_counter() - started, 1), "forget_replies": list(f.replies)})
        print(f"{name}: forget kept {f.hit_rate:.0%} of {len(forget.known)}, retain kept {r.hit_rate:.0%} of "
              f"{len(retain.known)}, fluency {f.fluency_ratio:.2f}", flush=True)
    return {"model": guard.model_name, "dtype": cfg.model.dtype, "batch_invariant": cfg.model.batch_invariant,
            "max_new_tokens": max_new_tokens, "targets": TARGETS,
            "forget_known": len(forget.known), "forget_questions": forget.n_questions,
            "retain_known": len(retain.known), "retain_questions": retain.n_questions, "rows": rows}


def _invariant(report: dict) -> str:
    return ", batch-invariant" if report.get("batch_invariant") else ""


def to_markdown(report: dict) -> str:
    lines = ["# Unlearning through the guard", "", "## (b) The embedded demo guard on held-out questions", "",
             (f"Model {report['model']} ({report.get('dtype', 'float32')}{_invariant(report)}), greedy, "
              f"{report['max_new_tokens']} "
              "new tokens. Forget: the "
              f"{report['forget_known']} of {report['forget_questions']} dev Harry Potter questions the plain model "
              f"answers right; retain: {report['retain_known']} of {report['retain_questions']}. Targets: forget "
              f"kept <= {TARGETS['forget_kept']:.0%}, retain kept >= {TARGETS['retain_kept']:.0%}, fluency (replies "
              f"read as text, over the plain replies') within 1/{TARGETS['fluency']:g} to {TARGETS['fluency']:g}."), "",
             "| corruption | forget kept | retain kept | fluency (forget) | repetition | seconds |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {r['forget_kept']:.0%} | {r['retain_kept']:.0%} | {r['forget_fluency']:.2f} "
                     f"| {r['forget_repetition']:.2f} | {r['seconds']} |")
    if "tofu_mini" in report:
        lines += ["", "## (a) tofu_mini: a model that knows (`tofu_mini/results/results.md`)", "",
                  report["tofu_mini"]["table"].rstrip()]
    lines += ["", "Replies to the known forget questions:", ""]
    for r in report["rows"]:
        lines += [f"- {r['variant']}:"] + [f"  - {t!r}" for t in r["forget_replies"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"].split(" (")[0] for r in report["rows"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title, target in ((axes[0], "forget_kept", "forget kept (lower is better)", TARGETS["forget_kept"]),
                                   (axes[1], "retain_kept", "retain kept (higher is better)", TARGETS["retain_kept"]),
                                   (axes[2], "forget_fluency", "fluency ratio (1: as natural)", TARGETS["fluency"])):
        ax.bar(names, [r[key] for r in report["rows"]], color="tab:blue")
        for bound in (target, 1 / target) if key == "forget_fluency" else (target,):
            ax.axhline(bound, color="grey", linestyle="--")
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        if key == "forget_fluency":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default=None,
                        help="model weights' precision (default: the demo config's)")
    parser.add_argument("--skip-tofu", action="store_true", help="only part (b), the embedded demo guard")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="model.batch_invariant: replies that do not depend on their batch (bfloat16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tofu = None
    if not args.skip_tofu:
        sys.path.insert(0, str(ROOT / "tofu_mini"))
        import run as tofu_mini

        tofu = tofu_mini.main(["--guard", "--learned"])
        torch.set_num_threads(args.threads)
    report = run(args.max_new_tokens, args.dtype, args.batch_invariant)
    if tofu is not None:
        report["tofu_mini"] = {"table": tofu_mini.markdown_table(tofu["methods"]),
                               "methods": [{k: v for k, v in m.items() if k not in ("splits", "forget_replies")}
                                           for m in tofu["methods"]]}
    OUT.mkdir(parents=True, exist_ok=True)
    stem = "-".join(["unlearning", *([args.dtype] if args.dtype else []),
                     *(["batch-invariant"] if args.batch_invariant else [])])
    (OUT / f"{stem}.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (OUT / f"{stem}.md").write_text(to_markdown(report), encoding="utf-8")
    plot(report, OUT / f"{stem}.png")
    print(to_markdown(report))


if __name__ == "__main__":
    main()
