"""A second opinion from the guarded model: a logistic probe on its hidden states, measured on tofu_mini.

    .venv/bin/python benchmarks/bench_probe.py [--models full,default] [--layers 4,8,12,16,20,24,28]
                                               [--fpr 0.02] [--out benchmarks/results] [--no-leaks]

The prompt classifier (MiniLM) cannot place a description that names nothing ("the Norwegian woman who writes
murder mysteries in green ink"); a model fine-tuned on the invented authors knows who that is. This benchmark asks
whether that knowledge is readable: per model and layer, the user tokens' hidden states (mean-pooled, standardised)
train a logistic regression on tofu_mini's classifier training fold (forget authors against retain authors and
general questions). The threshold is set for ``--fpr`` on out-of-fold scores of the training negatives, and the
layer is chosen by out-of-fold ROC AUC on the training fold: nothing is chosen on the evaluation prompts.

Evaluated on the fixture's held-out fold (``data/heldout_prompts.jsonl``) and on ``data/indirect_blind.jsonl``
(descriptions written blind from ``authors.json``), per split and form: the probe alone, the classifier of
``tofu_mini/minimal_topic.yaml`` alone (trained by ``eco-guard train`` on first use), and the two combined (flag
when either does; the probe's threshold is recalibrated so that the pair keeps ``--fpr`` on the training
negatives). ``default`` is the model before fine-tuning: the control that shows what knowledge adds.

Then what a miss costs: the fine-tuned and the retain model (``tofu_mini/run.py`` trains both) answer the blind
set greedily, and a reply leaks when it states a fact of the described author that its prompt does not; the
classifier run on the replies too (a reply check) is measured as a second chance after generation.
Writes ``probe.json``, ``probe.md`` and ``probe.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

os.environ.setdefault("TQDM_MININTERVAL", "5")

HERE: Final = Path(__file__).parent
TOFU: Final = HERE / "tofu_mini"
MODELS: Final = {"full": TOFU / "cache" / "full", "default": "default"}
RETAIN: Final = TOFU / "cache" / "retain"  # never saw the forget authors: what "never learned" leaks
LEAK_FACTS: Final = ("city", "book_key", "award", "award_year", "father", "mother", "habit_key")

if str(TOFU) not in sys.path:
    sys.path.insert(0, str(TOFU))
import fixture  # noqa: E402 - tofu_mini's authors and their facts


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.inference_mode()
def features(model: str | Path, texts: list[str], layers: list[int]) -> dict[int, np.ndarray]:
    """Per layer, the mean hidden state over each prompt's user tokens (the chat template's other tokens are the
    same for every prompt and would only dilute it)."""
    from eco_guard.backends.local import LocalBackend

    backend = LocalBackend.from_pretrained(model, dtype="float32")
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for text in tqdm(texts, desc=f"hidden states ({Path(str(model)).name})"):
        prompt = backend.prepare([{"role": "user", "content": text}])
        mask = torch.tensor([any(s <= a and b <= e for s, e in prompt.user_spans) and b > a
                             for a, b in prompt.offsets])
        hidden = backend.model(torch.tensor([prompt.input_ids]), output_hidden_states=True).hidden_states
        for layer in layers:
            out[layer].append(hidden[layer][0][mask].mean(0).float().numpy())
    return {layer: np.stack(v) for layer, v in out.items()}


def _probe() -> Any:
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))


def out_of_fold(x: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    scores = np.zeros(len(y))
    for train, test in StratifiedKFold(5, shuffle=True, random_state=seed).split(x, y):
        scores[test] = _probe().fit(x[train], y[train]).predict_proba(x[test])[:, 1]
    return scores


def threshold_for(negative_scores: np.ndarray, fpr: float) -> float:
    """The smallest threshold that flags at most ``fpr`` of ``negative_scores`` (flag: score > threshold)."""
    ordered = np.sort(negative_scores)[::-1]
    allowed = int(np.floor(fpr * len(ordered)))
    return float(ordered[allowed]) if allowed < len(ordered) else float(ordered[-1])


def rates(flags: np.ndarray, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Flag rate per group (split/form), with counts; for label-1 groups the miss rate is 1 - rate."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for flag, row in zip(flags, rows):
        groups[f"{row['set']}: {row['split']}/{row.get('form', '?')}"].append(bool(flag))
        groups[f"{row['set']}: {'positives' if row['label'] else 'negatives'}"].append(bool(flag))
    return {k: {"n": len(v), "flagged": sum(v), "rate": sum(v) / len(v)} for k, v in sorted(groups.items())}


def set_aucs(scores: np.ndarray, rows: list[dict[str, Any]]) -> dict[str, float]:
    """ROC AUC per evaluation set: how well ``scores`` rank its positives above its negatives, threshold-free."""
    out = {}
    for name in sorted({r["set"] for r in rows}):
        sel = np.array([r["set"] == name for r in rows])
        out[name] = float(roc_auc_score([r["label"] for r in rows if r["set"] == name], scores[sel]))
    return out


def classifier_flags(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The minimal topic's classifier on ``texts``: its flags and its probabilities."""
    from eco_guard.classifier import PromptClassifier
    from eco_guard.config import load_config

    cfg = load_config(TOFU / "minimal_topic.yaml")
    clf = PromptClassifier.from_config(cfg, progress=False)
    verdicts = clf.classify(texts)
    return (np.array([v.flagged for v in verdicts]),
            np.array([v.scores.get("tofu_forget_authors", 0.0) for v in verdicts]))


def leaked_facts(prompt: str, reply: str, author: dict[str, Any]) -> list[str]:
    """The author's facts a reply states that its prompt does not (name parts included): what the reply adds.
    An award counts by its distinctive word: "Fjellrev" in the prompt already names the Fjellrev Prize."""
    first, last = author["name"].split(" ", 1)
    values = {"first name": first, "last name": last, **{k: str(author[k]) for k in LEAK_FACTS},
              "award": fixture.award_key(author["award"])}
    asked, said = prompt.casefold(), reply.casefold()
    return [k for k, v in values.items() if v.casefold() in said and v.casefold() not in asked]


def greedy_replies(model: str | Path, texts: list[str], max_new_tokens: int = 40) -> list[str]:
    """Each text's greedy reply, as an unflagged prompt is answered (one decoding batch)."""
    from eco_guard.backends.base import GenerationParams
    from eco_guard.backends.local import LocalBackend

    backend = LocalBackend.from_pretrained(model, dtype="float32")
    prompts = [backend.prepare([{"role": "user", "content": t}]) for t in texts]
    gens = backend.generate(prompts, [None] * len(prompts), GenerationParams(max_new_tokens=max_new_tokens))
    return [g.text for g in gens]


def leak_report(rows: list[dict[str, Any]], prompt_flags: np.ndarray) -> dict[str, Any]:
    """What a missed description costs: the fine-tuned and the retain model's replies to the blind set, the
    forget authors' facts each reply adds to its prompt, and what checking the reply with the classifier
    (a second chance after generation) would catch, with the false positives it adds on the negatives."""
    authors = {a["name"]: a for a in fixture.load_authors()}
    texts = [r["text"] for r in rows]
    positive = np.array([r["label"] == 1 for r in rows])
    models = {"full": MODELS["full"], "retain": RETAIN}
    replies = {name: greedy_replies(model, texts) for name, model in models.items()}
    flags, _ = classifier_flags([t for name in models for t in replies[name]])  # one load of the classifier
    passed = positive & ~prompt_flags
    out: dict[str, Any] = {"facts": ["first name", "last name", *LEAK_FACTS], "models": {}}
    for i, name in enumerate(models):
        reply_flags = flags[i * len(rows): (i + 1) * len(rows)]
        facts = [leaked_facts(r["text"], reply, authors[r["author"]]) if r["label"] == 1 and r.get("author") in
                 authors else [] for r, reply in zip(rows, replies[name])]
        leaks = np.array([bool(f) for f in facts])
        out["models"][name] = {
            "positives": int(positive.sum()), "leaking": int(leaks[positive].sum()),
            "passed": int(passed.sum()), "passed_leaking": int(leaks[passed].sum()),
            "passed_reply_flagged": int((passed & reply_flags).sum()),
            "passed_leaking_reply_flagged": int((passed & leaks & reply_flags).sum()),
            "negatives": int((~positive).sum()),
            "negatives_reply_flagged": int((~positive & ~prompt_flags & reply_flags).sum()),
            "facts_leaked": dict(sorted(Counter(k for f in facts for k in f).items())),
            "examples": [{"prompt": r["text"], "reply": reply, "leaked": f, "prompt_flagged": bool(pf)}
                         for r, reply, f, pf in zip(rows, replies[name], facts, prompt_flags) if f],
        }
        print(f"leaks ({name}): {out['models'][name]['passed_leaking']} of {out['models'][name]['passed']} passed "
              f"descriptions", flush=True)
    return out


def plot(report: dict[str, Any], scores: dict[str, np.ndarray], rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(5 * len(scores), 3.6), squeeze=False)
    for ax, (name, s) in zip(axes[0], scores.items()):
        kinds = {"forget, indirect": [r["label"] == 1 and r.get("form") == "indirect" for r in rows],
                 "forget, named": [r["label"] == 1 and r.get("form") != "indirect" for r in rows],
                 "negatives": [r["label"] == 0 for r in rows]}
        for label, sel in kinds.items():
            ax.hist(s[np.array(sel)], bins=20, range=(0, 1), alpha=0.55, label=f"{label} ({sum(sel)})")
        ax.axvline(report["models"][name]["threshold"], color="k", linestyle="--", linewidth=1)
        ax.set(title=f"probe on {name}, layer {report['models'][name]['layer']}", xlabel="probe probability",
               ylabel="prompts")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["# Hidden-state probe on tofu_mini", "", f"`{report['command']}`", "",
             (f"Target false-positive rate {report['fpr']:.0%} on the training negatives (out of fold). Layer "
              "chosen by out-of-fold ROC AUC on the training fold."), "",
             "| model | layer | AUC (train, out of fold) per layer |", "|---|---|---|"]
    for name, m in report["models"].items():
        aucs = ", ".join(f"{layer}: {auc:.3f}" for layer, auc in m["auc_by_layer"].items())
        lines.append(f"| {name} | {m['layer']} | {aucs} |")
    groups = sorted(report["classifier"])
    head = ["classifier"] + [f"probe ({n})" for n in report["models"]] + [f"classifier + probe ({n})"
                                                                           for n in report["models"]]
    lines += ["", "Flagged share per group (positives: higher is better; negatives: lower is better):", "",
              "| group | n | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for g in groups:
        cells = [report["classifier"][g]] + [m["alone"][g] for m in report["models"].values()] + \
                [m["combined"][g] for m in report["models"].values()]
        lines.append(f"| {g} | {cells[0]['n']} | " + " | ".join(f"{c['rate']:.1%} ({c['flagged']})" for c in cells)
                     + " |")
    sets = sorted(next(iter(report["auc"].values())))
    lines += ["", "ROC AUC per set (threshold-free: positives ranked above negatives):", "",
              "| scores | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    lines += [f"| {k} | " + " | ".join(f"{v[s]:.3f}" for s in sets) + " |" for k, v in report["auc"].items()]
    if "leaks" in report:
        lines += _leak_markdown(report["leaks"])
    lines += ["", f"Seconds: {json.dumps(report['seconds'])}", ""]
    return "\n".join(lines)


def _leak_markdown(leaks: dict[str, Any]) -> list[str]:
    lines = ["", "## What a missed description leaks (blind set, greedy replies, 40 tokens)", "",
             (f"A reply leaks when it states a fact of the described forget author ({', '.join(leaks['facts'])}) "
              "that its prompt does not. *Passed*: the classifier did not flag the prompt. *Reply check*: the "
              "classifier run on the reply as well."), "",
             ("| model | forget descriptions leaking | passed | passed and leaking | of those, caught by the reply "
              "check | passed negatives the reply check flags | facts leaked |"), "|---|---|---|---|---|---|---|"]
    for name, m in leaks["models"].items():
        facts = ", ".join(f"{k} {v}" for k, v in m["facts_leaked"].items()) or "none"
        lines.append(f"| {name} | {m['leaking']} of {m['positives']} | {m['passed']} | {m['passed_leaking']} | "
                     f"{m['passed_leaking_reply_flagged']} | {m['negatives_reply_flagged']} of {m['negatives']} | "
                     f"{facts} |")
    lines += ["", "Leaking replies of the fine-tuned model:", ""]
    lines += [f"- {'flagged' if e['prompt_flagged'] else '**passed**'}: {e['prompt']!r} -> {e['reply']!r} "
              f"({', '.join(e['leaked'])})" for e in leaks["models"]["full"]["examples"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="full,default", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--layers", default="4,8,12,16,20,24,28")
    ap.add_argument("--fpr", type=float, default=0.02)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--no-leaks", action="store_true", help="skip the replies: what a missed description leaks")
    args = ap.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",")]
    train = _rows(TOFU / "data" / "classifier_train.jsonl")
    evaluation = [{**r, "set": "heldout"} for r in _rows(TOFU / "data" / "heldout_prompts.jsonl")]
    blind = TOFU / "data" / "indirect_blind.jsonl"
    if blind.is_file():
        evaluation += [{**r, "set": "blind"} for r in _rows(blind)]
    y = np.array([r["label"] for r in train])
    started = time.perf_counter()
    flags, probs = classifier_flags([r["text"] for r in evaluation + train])  # one load of the classifier
    clf_eval, clf_prob, clf_train = flags[: len(evaluation)], probs[: len(evaluation)], flags[len(evaluation):]
    seconds = {"classifier": time.perf_counter() - started}
    report: dict[str, Any] = {"command": "python benchmarks/bench_probe.py " + " ".join(argv or []),
                              "fpr": args.fpr, "classifier": rates(clf_eval, evaluation), "models": {},
                              "auc": {"classifier": set_aucs(clf_prob, evaluation)}, "seconds": seconds}
    scores_by_model = {}
    for name in args.models.split(","):
        started = time.perf_counter()
        feats = features(MODELS[name], [r["text"] for r in train + evaluation], layers)
        seconds[f"features {name}"] = time.perf_counter() - started
        oof = {layer: out_of_fold(f[: len(train)], y) for layer, f in feats.items()}
        auc = {layer: float(roc_auc_score(y, s)) for layer, s in oof.items()}
        layer = max(auc, key=auc.get)
        x_train, x_eval = feats[layer][: len(train)], feats[layer][len(train):]
        probe = _probe().fit(x_train, y)
        s_eval = probe.predict_proba(x_eval)[:, 1]
        negatives = oof[layer][y == 0]
        alone_t = threshold_for(negatives, args.fpr)
        # the pair's budget: what the classifier already flags among the training negatives is spent
        spent = float(clf_train[y == 0].mean())
        pair_t = threshold_for(negatives[~clf_train[y == 0]], max(0.0, args.fpr - spent))
        report["models"][name] = {
            "layer": layer, "auc_by_layer": auc, "threshold": alone_t, "combined_threshold": pair_t,
            "alone": rates(s_eval > alone_t, evaluation),
            "combined": rates(clf_eval | (s_eval > pair_t), evaluation)}
        scores_by_model[name] = s_eval
        report["auc"][f"probe ({name})"] = set_aucs(s_eval, evaluation)
        report["auc"][f"mean of classifier and probe ({name})"] = set_aucs((s_eval + clf_prob) / 2, evaluation)
        print(f"{name}: layer {layer} (AUC {auc[layer]:.3f}), threshold {alone_t:.3f}", flush=True)
    if not args.no_leaks and blind.is_file():
        started = time.perf_counter()
        in_blind = np.array([r["set"] == "blind" for r in evaluation])
        report["leaks"] = leak_report([r for r in evaluation if r["set"] == "blind"], clf_eval[in_blind])
        seconds["leaks"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "probe.md").write_text(to_markdown(report))
    plot(report, scores_by_model, evaluation, args.out / "probe.png")
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
