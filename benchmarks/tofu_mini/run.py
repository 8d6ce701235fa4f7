"""tofu_mini in one command: fine-tune, unlearn, corrupt, measure, tabulate, plot.

    python benchmarks/tofu_mini/run.py            # everything, cached
    python benchmarks/tofu_mini/run.py --no-train # only what is already cached
    python benchmarks/tofu_mini/run.py --guard    # + ECO routed by Guard.from_config("eco.yaml")

Models are cached under ``cache/`` (see ``finetune.py``), per-item measurements under
``results/raw/`` (recomputed only when the model or the data changes). Writes
``results/results.json``, ``results/results.md``, ``results/sweep.json`` and
``results/forget_vs_utility.png``.

Methods: ``full`` (no unlearning), ``retain`` (retrained without the forget authors: the
target), ``grad_ascent`` and ``grad_diff`` (weight updates), and ECO: the full model with
the forget authors' names corrupted in the prompt embeddings (``rand_noise_first_n``,
one dimension), swept over the strength sigma. In this direct evaluation, routing is an
oracle: forget questions are corrupted, retain and general questions are not (they are
the full model's answers); with ``--guard``, the guard's classifier replaces the oracle in
the rows "ECO ... through the guard" (see ``measure_eco_guard``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import torch

HERE: Final = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import finetune  # noqa: E402
from fixture import DATA_DIR, load_qa  # noqa: E402
from scoring import (  # noqa: E402
    ECO_CONFIG,
    LEARNED_CONFIG,
    eco_spec,
    eval_items,
    forget_keywords,
    guard_answer_corruptor,
    guard_corruptor,
    heldout_routing,
    keyword_answer_corruptor,
    keyword_corruptor,
    measure,
    reply_nlls,
    split_scores,
    summarise,
)

from eco_guard.eval import tofu  # noqa: E402

RESULTS: Final = HERE / "results"
RAW: Final = RESULTS / "raw"
SIGMAS: Final = (1.0, 3.0, 5.0, 10.0, 30.0)
WEIGHT_METHODS: Final = ("full", "retain", "grad_ascent", "grad_diff")
# How eco_learned.eco.json was learned (eco_learned.yaml names the command); the fluency bound is optimize's
# default (replies read as text within 2x of the plain replies' perplexity, either way).
LEARNING: Final = {"modes": ("keywords", "content", "salient"), "dims": (1, 4), "steps": 10,
                   "target_hit_rate": 0.05}
logger = logging.getLogger("tofu_mini.run")


def _fingerprint(*parts: Any) -> str:
    """Hash of what a measurement depends on: the data and the model's training log."""
    h = hashlib.sha256((DATA_DIR / "qa.jsonl").read_bytes())
    for part in parts:
        h.update(json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()[:16]


def cached(name: str, fingerprint: str, compute: Callable[[], dict]) -> dict:
    """Load ``results/raw/<name>.json`` if its fingerprint matches, else compute and save it."""
    path = RAW / f"{name}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == fingerprint:
            return saved
    start = time.perf_counter()
    result = {"fingerprint": fingerprint, **compute()}
    result["eval_seconds"] = round(time.perf_counter() - start, 1)
    RAW.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, ensure_ascii=False))
    logger.info("measured %s in %.0f s", name, result["eval_seconds"])
    return result


def measure_weights(name: str, items: dict) -> dict:
    """Measure a fine-tuned / unlearned model on every split (plus all author questions
    for ``full`` and ``retain``: the fixture's accuracy target)."""
    info = finetune.read_info(name)

    def compute() -> dict:
        model, tokenizer = finetune.load_model(finetune.CACHE_DIR / name)
        model.eval()
        out = {"splits": {split: measure(model, tokenizer, its, desc=f"{name}/{split}")
                          for split, its in items.items()}}
        if name in ("full", "retain"):
            authors = load_qa(["forget", "retain"])
            replies = tofu.generate_answers(model, tokenizer, authors, max_new_tokens=32)
            out["all_authors_hit_rate"] = tofu.hit_rate(replies, [i.keys for i in authors])
            out["all_authors_replies"] = replies
        return out

    return {**cached(name, _fingerprint(name, info), compute), "cost_seconds": info["seconds"]}


def measure_base_general(items: dict) -> dict:
    """The untuned base model on the general questions: how much world knowledge the
    fine-tuning itself cost (every fine-tuned model inherits that loss)."""
    def compute() -> dict:
        model, tokenizer = finetune.load_model("default")
        return {"general": measure(model.eval(), tokenizer, items["general"], desc="base/general")}

    raw = cached("base_general", _fingerprint("base"), compute)["general"]
    return split_scores(raw, items["general"], "general")


def measure_eco(sigma: float, items: dict, full_raw: dict) -> dict[str, dict]:
    """ECO at strength ``sigma`` on the full model, scored two ways.

    ``prefill``: only the question's keyword tokens are corrupted, as the guard does.
    ``paper``: the keyword tokens inside each scored answer are corrupted as well, as the
    ECO paper's code scores TOFU (its token classifier runs over prompt + answer); replies
    are the same (generation never corrupts generated tokens). Retain and general
    questions are the full model's (oracle routing).
    """
    spec, keywords = eco_spec(sigma), forget_keywords()
    info = finetune.read_info("full")
    fingerprint = _fingerprint("eco", info, spec.model_dump(), keywords)
    model_cache: list = []

    def model_and_tokenizer():
        if not model_cache:
            model, tokenizer = finetune.load_model(finetune.CACHE_DIR / "full")
            model_cache.extend([model.eval(), tokenizer])
        return model_cache

    def prefill() -> dict:
        model, tokenizer = model_and_tokenizer()
        return {"forget": measure(model, tokenizer, items["forget"], keyword_corruptor(spec, keywords),
                                  desc=f"eco sigma={sigma}")}

    def paper() -> dict:
        model, tokenizer = model_and_tokenizer()
        return {"forget": measure(model, tokenizer, items["forget"], keyword_corruptor(spec, keywords),
                                  desc=f"eco sigma={sigma} (paper scoring)",
                                  corrupt_answer=keyword_answer_corruptor(spec, keywords), generate=False)}

    raw_prefill = cached(f"eco_sigma{sigma:g}", fingerprint, prefill)
    raw_paper = cached(f"eco_sigma{sigma:g}_paper", fingerprint, paper)
    shared = {"retain": full_raw["splits"]["retain"], "general": full_raw["splits"]["general"]}
    paper_forget = {**raw_paper["forget"], "replies": raw_prefill["forget"]["replies"]}
    return {"prefill": {"splits": {"forget": raw_prefill["forget"], **shared}},
            "paper": {"splits": {"forget": paper_forget, **shared}},
            "eval_seconds": raw_prefill["eval_seconds"] + raw_paper["eval_seconds"]}


def learned_variants(guard: Any, store_path: Path) -> dict[str, tuple[Any, Any]]:
    """Per selection mode the search tried, the candidate its rule picks among that mode's (``best_candidate``),
    as ``(spec, selection)``; the store's own choice is one of them (``guard.corruption_of``)."""
    from eco_guard.optimize import Candidate, best_candidate
    from eco_guard.store import CorruptionStore

    topic = guard.config.topics[0]
    entry = CorruptionStore.load(store_path).topics[topic.name]
    spec, selection = guard.corruption_of(topic.name)
    out = {}
    candidates = [Candidate.from_row(row) for row in entry.candidates]
    for mode in dict.fromkeys(c.mode for c in candidates):
        best = best_candidate([c for c in candidates if c.mode == mode], entry.objective["max_fluency_ratio"],
                              entry.objective["repetition_bound"])
        out[mode] = (spec.model_copy(update={"method": best.method, "dims": best.dims, "strength": best.strength}),
                     selection.model_copy(update={"mode": mode}))
    return out


def guard_and_cost(config_path: Path = ECO_CONFIG) -> tuple[Any, float]:
    """``Guard.from_config(config_path)`` and the seconds its classifier took to train (trained on first use,
    and remembered beside it: that time is part of ECO's cost)."""
    from eco_guard.config import load_config
    from eco_guard.guard import Guard

    config = load_config(config_path)
    cost_file = config.classifier.path / "tofu_mini_train_seconds.json"
    start = time.perf_counter()
    guard = Guard.from_config(config, progress=True)
    if not cost_file.exists():  # trained just now: remember how long it took
        cost_file.write_text(json.dumps({"seconds": round(time.perf_counter() - start, 1)}))
    return guard, json.loads(cost_file.read_text())["seconds"]


def measure_eco_guard(items: dict, guard: Any, cost: float, name: str = "eco_guard") -> dict:
    """ECO through ``guard`` (``guard_and_cost``): its classifier decides every question
    (forget, retain and general), its selection and corruption apply to the flagged ones.

    Scored two ways, as the oracle-routed ECO: ``prefill`` (what the guard does) and
    ``paper`` (the flagged topic's keywords also corrupted inside the scored answers).
    Also routes the classifier's held-out prompts (``data/prompts.jsonl``, fold ``test``:
    questions, instructions, chat, indirect references). ``name``: the raw files' stem (one per
    corruption measured; the routing depends on the classifier only and is shared).
    """
    config = guard.config
    info = finetune.read_info("full")
    classifier_files = sorted(p.name for p in config.classifier.path.iterdir())
    fingerprint = _fingerprint("eco_guard", info, config.model_dump(mode="json"), classifier_files)
    model, tokenizer = guard.backend.model, guard.backend.tokenizer

    def prefill() -> dict:
        decisions: dict[str, dict] = {}
        corrupt = guard_corruptor(guard, decisions)
        splits = {split: measure(model, tokenizer, its, corrupt, desc=f"eco guard/{split}")
                  for split, its in items.items()}
        return {"splits": splits, "decisions": decisions}

    def paper() -> dict:
        decisions: dict[str, dict] = {}
        corrupt, corrupt_answer = guard_corruptor(guard, decisions), guard_answer_corruptor(guard, decisions)
        return {"splits": {split: measure(model, tokenizer, its, corrupt, desc=f"eco guard/{split} (paper scoring)",
                                          corrupt_answer=corrupt_answer, generate=False)
                           for split, its in items.items()}}

    def heldout() -> dict:
        rows = [json.loads(line) for line in (DATA_DIR / "prompts.jsonl").read_text().splitlines() if line.strip()]
        return heldout_routing(guard, [r for r in rows if r["fold"] == "test"])

    raw = cached(name, fingerprint, prefill)
    raw_paper = cached(f"{name}_paper", fingerprint, paper)
    routing = cached("eco_guard_heldout_routing", _fingerprint("routing", info, classifier_files), heldout)
    flagged = {split: sum(raw["decisions"][i.question]["flagged"] for i in its) / len(its)
               for split, its in items.items()}
    paper_splits = {split: {**raw_paper["splits"][split], "replies": raw["splits"][split]["replies"]}
                    for split in items}
    return {"prefill": {"splits": raw["splits"]}, "paper": {"splits": paper_splits}, "decisions": raw["decisions"],
            "cost_seconds": cost, "flagged_rate": flagged, "heldout_routing": routing,
            "eval_seconds": raw["eval_seconds"] + raw_paper["eval_seconds"] + routing["eval_seconds"],
            "strength": guard.corruption_of(config.topics[0].name)[0].strength}


def learned_rows(items: dict, retain_forget: dict) -> list[dict]:
    """ECO through the guard with the learned corruption (``eco_learned.yaml`` and its store): one row per
    selection mode and scoring. Cost: the search's seconds (stored in the report), plus classifier training."""
    from eco_guard.optimize import optimize_config
    from eco_guard.store import CorruptionStore, StoreError, default_store_path

    try:
        guard, cost = guard_and_cost(LEARNED_CONFIG)
    except StoreError as exc:  # no store, or one learned on another fine-tuning of cache/full: learn it here
        logger.info("%s; learning it (about 12 min on 2 cores)", exc)
        optimize_config(LEARNED_CONFIG, **LEARNING)
        guard, cost = guard_and_cost(LEARNED_CONFIG)
    config = guard.config
    store = config.store or default_store_path(config.source)
    chosen = guard.corruption_of(config.topics[0].name)[1].mode
    search = CorruptionStore.load(store).topics[config.topics[0].name].objective.get("seconds", 0.0)
    rows = []
    for mode, (spec, selection) in learned_variants(guard, store).items():
        variant = guard.with_corruption(config.topics[0].name, spec, selection)
        raw = measure_eco_guard(items, variant, cost, f"eco_guard_{mode}")
        routed = "/".join(f"{raw['flagged_rate'][k]:.0%}" for k in ("forget", "retain", "general"))
        what = f"{spec.method} dims {spec.dims}" + (f" σ={spec.strength:.3g}" if spec.method.startswith("rand") else "")
        for scored, label in (("paper", "paper scoring"), ("prefill", "prefill only")):
            rows.append(_row(f"ECO learned, {mode}{' (stored)' if mode == chosen else ''}: {what}, {label}",
                             summarise(raw[scored]["splits"], retain_forget, items), cost + search,
                             note="corruption learned by eco-guard optimize on data/forget_learn_qa.jsonl",
                             routing=routed))
    return rows


def pick_sigma(sweep: dict[float, dict]) -> float:
    """The strength with the best forget quality; among near-ties (within 10%) the smallest,
    since a weaker corruption keeps replies more fluent."""
    best = max(s["forget_quality"] for s in sweep.values())
    return min(sigma for sigma, s in sweep.items() if s["forget_quality"] >= 0.9 * best)


def _row(name: str, summary: dict, cost: float, note: str = "", routing: str = "—") -> dict:
    """One line of the results table; ``routing``: share of forget/retain/general questions corrupted."""
    return {"method": name, **{k: summary[k] for k in ("forget_quality", "model_utility", "forget_rouge_l",
                                                       "forget_hit_rate", "forget_replies")}, "cost_seconds": cost,
            "routing": routing, "note": note, "splits": summary["splits"]}


def add_fluency(rows: list[dict], items: dict) -> None:
    """Each row's ``forget_fluency``: perplexity of its forget replies under the base model (untuned SmolLM2,
    which knows none of the authors: a judge of the text, not of the facts) over that of the retain model's
    replies (the model that never learned them: 1.0). Babble is far above 1."""
    replies = {r["method"]: r["forget_replies"] for r in rows}
    fingerprint = _fingerprint("fluency", "base judge", replies)

    def compute() -> dict:
        model, tokenizer = finetune.load_model("default")
        model.eval()
        with torch.inference_mode():
            return {"nll": {name: reply_nlls(model, tokenizer, items["forget"], texts)
                            for name, texts in replies.items()}}

    nll = cached("fluency", fingerprint, compute)["nll"]
    reference = sum(nll["retain"]) / len(nll["retain"])
    for r in rows:
        r["forget_fluency"] = math.exp(sum(nll[r["method"]]) / len(nll[r["method"]]) - reference)


def markdown_table(rows: list[dict]) -> str:
    """method × forget quality, model utility, forget ROUGE-L, forget hit rate, forget fluency, cost, and for
    ECO the share of forget/retain/general questions corrupted."""
    lines = [("| method | forget quality ↑ | model utility ↑ | forget ROUGE-L | forget hit rate | forget fluency | "
              "cost (s) | corrupted: forget/retain/general |"),
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['forget_quality']:.3g} | {r['model_utility']:.3f} | "
                     f"{r['forget_rouge_l']:.3f} | {r['forget_hit_rate']:.2f} | {r['forget_fluency']:.2f} | "
                     f"{r['cost_seconds']:.0f} | "
                     f"{r.get('routing', '—')} |")
    return "\n".join(lines) + "\n"


def routing_table(routing: dict) -> str:
    """The guard's classifier on its held-out prompts: share flagged per split and form."""
    lines = ["\nGuard's classifier on the held-out prompts (`data/prompts.jsonl`, fold `test`), share flagged:\n",
             "| split / form | prompts | flagged |", "|---|---|---|"]
    lines += [f"| {k} | {routing['n'][k]} | {v:.1%} |" for k, v in routing["flagged_rate"].items()]
    lines += ["", "Misrouted: " + ("; ".join(f"{m['split']}/{m['form']} \"{m['text']}\" ({m['score']:.2f})"
                                            for m in routing["misrouted"]) or "none")]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], sweep_rows: list[dict], path: Path) -> None:
    """Forget quality (log) against model utility, one point per method; ECO's sweep as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for key, colour, label in (("forget_quality", "tab:green", "ECO sweep (paper scoring)"),
                               ("forget_quality_prefill", "tab:olive", "ECO sweep (prefill only)")):
        ax.plot([r["model_utility"] for r in sweep_rows], [r[key] for r in sweep_rows], "x:", color=colour,
                alpha=0.7, label=label)
        for r in sweep_rows:
            ax.annotate(f"σ={r['sigma']:g}", (r["model_utility"], r[key]), fontsize=7,
                        textcoords="offset points", xytext=(4, -8), color=colour)
    markers = "osD^v*P"
    for r, marker in zip(rows, markers * 3):
        # methods go in the legend: several sit on top of each other near utility 0.55-0.6
        if "through the guard" in r["method"]:  # drawn hollow and larger: it can sit on its oracle twin
            ax.scatter(r["model_utility"], r["forget_quality"], s=180, marker=marker, zorder=4, facecolors="none",
                       edgecolors="black" if "paper" in r["method"] else "grey", linewidths=1.5, label=r["method"])
            continue
        ax.scatter(r["model_utility"], r["forget_quality"], s=70, marker=marker, zorder=3, alpha=0.85,
                   label=r["method"])
    ax.set_yscale("log")
    ax.set_xlabel("model utility (retain + general)")
    ax.set_ylabel("forget quality (KS p-value vs retain model)")
    ax.set_title("tofu_mini: SmolLM2-135M-Instruct, 3 of 30 authors forgotten")
    ax.legend(fontsize=7, loc="center left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Run the whole benchmark; returns what ``results.json`` holds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-train", action="store_true", help="fail instead of training missing models")
    parser.add_argument("--guard", action="store_true",
                        help="also run ECO through Guard.from_config('eco.yaml') (trains its classifier once)")
    parser.add_argument("--learned", action="store_true",
                        help="also run ECO through Guard.from_config('eco_learned.yaml'), the corruption learned by "
                             "`eco-guard optimize`, best per selection mode")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(finetune.NUM_THREADS)
    for name in WEIGHT_METHODS:
        if not finetune.is_cached(name):
            if args.no_train:
                raise SystemExit(f"model {name!r} is not cached; run without --no-train")
            finetune.build(name)

    items = eval_items()
    raws = {name: measure_weights(name, items) for name in WEIGHT_METHODS}
    retain_forget = raws["retain"]["splits"]["forget"]
    rows = [_row(name, summarise(raws[name]["splits"], retain_forget, items), raws[name]["cost_seconds"])
            for name in WEIGHT_METHODS]

    sweep = {sigma: measure_eco(sigma, items, raws["full"]) for sigma in SIGMAS}
    summaries = {variant: {sigma: summarise(r[variant]["splits"], retain_forget, items) for sigma, r in sweep.items()}
                 for variant in ("prefill", "paper")}
    sweep_cost = sum(r["eval_seconds"] for r in sweep.values())
    sigma = pick_sigma(summaries["paper"])
    rows.append(_row(f"ECO σ={sigma:g}, paper scoring", summaries["paper"][sigma], sweep_cost,
                     note="names corrupted in prompt and scored answers, as the ECO paper scores; oracle routing; "
                          "no weight change, cost = the strength sweep", routing="100%/0%/0% (oracle)"))
    rows.append(_row(f"ECO σ={sigma:g}, prefill only", summaries["prefill"][sigma], sweep_cost,
                     note="names corrupted in the prompt only, as the guard does; oracle routing",
                     routing="100%/0%/0% (oracle)"))
    sweep_rows = [{"sigma": s, "forget_quality_prefill": summaries["prefill"][s]["forget_quality"],
                   **summaries["paper"][s]} for s in SIGMAS]
    guard_flagged = guard_routing = None
    if args.guard:
        guard_raw = measure_eco_guard(items, *guard_and_cost())
        guard_flagged, guard_routing = guard_raw["flagged_rate"], guard_raw["heldout_routing"]
        routed = "/".join(f"{guard_flagged[k]:.0%}" for k in ("forget", "retain", "general"))
        # ECO's cost through the guard: training its classifier, plus the sweep that chose sigma.
        guard_cost = guard_raw["cost_seconds"] + sweep_cost
        for variant, label in (("paper", "paper scoring"), ("prefill", "prefill only")):
            rows.append(_row(f"ECO σ={guard_raw['strength']:g} through the guard, {label}",
                             summarise(guard_raw[variant]["splits"], retain_forget, items), guard_cost,
                             note=f"classifier routing (flagged forget/retain/general: {routed}); cost = classifier "
                                  f"training {guard_raw['cost_seconds']:.0f} s + strength sweep {sweep_cost:.0f} s",
                             routing=routed))
            rows[-1]["classifier_train_seconds"] = guard_raw["cost_seconds"]

    if args.learned:
        rows += learned_rows(items, retain_forget)
    add_fluency(rows, items)

    base_general = measure_base_general(items)
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {
        "base_model_general": base_general,
        "full_model_general": rows[0]["splits"]["general"],
        "full_model_accuracy_all_authors": raws["full"]["all_authors_hit_rate"],
        "retain_model_accuracy_all_authors": raws["retain"]["all_authors_hit_rate"],
        "training": {name: finetune.read_info(name) for name in WEIGHT_METHODS},
        "eval_items": {split: len(its) for split, its in items.items()},
        "chosen_sigma": sigma,
        "guard_flagged_rate": guard_flagged,
        "guard_heldout_routing": guard_routing,
        "methods": rows,
    }
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    (RESULTS / "sweep.json").write_text(json.dumps({"chosen_sigma": sigma, "sweep": sweep_rows}, indent=2))
    table = markdown_table(rows)
    sweep_table = ("| σ | forget quality (paper scoring) | forget quality (prefill only) | forget ROUGE-L | "
                   "forget hit rate | model utility |\n|---|---|---|---|---|---|\n") + "".join(
        f"| {r['sigma']:g} | {r['forget_quality']:.3g} | {r['forget_quality_prefill']:.3g} | "
        f"{r['forget_rouge_l']:.3f} | {r['forget_hit_rate']:.2f} | {r['model_utility']:.3f} |\n" for r in sweep_rows)
    (RESULTS / "results.md").write_text(
        f"Full model answers {results['full_model_accuracy_all_authors']:.1%} of the 180 author questions "
        f"(retain model: {results['retain_model_accuracy_all_authors']:.1%}). General questions: base model "
        f"hit rate {base_general['hit_rate']:.0%}, full model {results['full_model_general']['hit_rate']:.0%}.\n\n"
        f"{table}\nECO strength sweep:\n\n{sweep_table}"
        + (routing_table(guard_routing) if guard_routing else ""))
    plot(rows, sweep_rows, RESULTS / "forget_vs_utility.png")
    logger.info("\n%s", table)
    return results


if __name__ == "__main__":
    main()
