"""How well the prompt classifier separates forget-topic prompts from the rest.

Rates per topic, counted from the classifier's decisions (false negatives: a topic's
prompt whose topic was not among the flagged ones; false positives: a negative prompt
flagged for it, by the model or by a term), the same split by any ``style``/``kind``/``lang``/``split``
field of the rows, a confusion table (true topic x predicted topic), and a PNG of histograms
of the model's probabilities with the thresholds.

Example:
    >>> rows = load_eval_rows(["data/retain/prompts.jsonl"], ["harry_potter"])  # doctest: +SKIP
    >>> report = evaluate(clf, rows)  # doctest: +SKIP
    >>> write_report(report, "out/")  # doctest: +SKIP
    {'json': PosixPath('out/classifier_report.json'), 'markdown': ..., 'png': ...}
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from eco_guard.classifier import Classification, PromptClassifier, read_rows
from eco_guard.errors import DataError

__all__ = ["EvalRow", "evaluate", "load_eval_rows", "plot_histograms", "to_markdown", "write_report"]

GROUP_FIELDS: Final = ("style", "kind", "lang", "split")
NONE: Final = "none"
MAX_LISTED_ERRORS: Final = 40
_NEGATIVE_TOPICS: Final = frozenset({"", "none", "null", "negative"})


@dataclass(frozen=True)
class EvalRow:
    """One labelled prompt: ``topic`` is the true topic, None for a negative."""

    text: str
    topic: str | None
    fields: dict[str, str] = field(default_factory=dict)


def load_eval_rows(paths: Sequence[str | Path], topics: Sequence[str]) -> list[EvalRow]:
    """Read labelled prompts. The truth is a row's ``topic`` field, else its ``label`` (0: negative;
    1: the topic named in the file's path, or the only topic).

    Raises:
        DataError: a row whose truth cannot be told (names file and line).
    """
    out = []
    for path in paths:
        path_topic = next((t for t in topics if t in Path(path).parts), topics[0] if len(topics) == 1 else None)
        for row in read_rows(path):
            out.append(EvalRow(row["text"], _truth(row, topics, path_topic),
                               {k: str(row[k]) for k in GROUP_FIELDS if row.get(k) is not None}))
    return out


def _truth(row: dict[str, Any], topics: Sequence[str], path_topic: str | None) -> str | None:
    where = f"{row['_file']}:{row['_line']}"
    if "topic" in row:
        topic = row["topic"]
        if topic is None or str(topic).lower() in _NEGATIVE_TOPICS:
            return None
        if topic not in topics:
            raise DataError(f"{where}: topic {topic!r} is not in the config (topics: {', '.join(topics)})")
        return str(topic)
    label = row.get("label")
    if label in (0, "0", False, "false"):
        return None
    if label in (1, "1", True, "true"):
        if path_topic is None:
            raise DataError(f"{where}: label 1 but no 'topic' field, and the file path names no configured topic")
        return path_topic
    raise DataError(f"{where}: needs a 'topic' field or a 'label' of 0 or 1")


def evaluate(clf: PromptClassifier, rows: Sequence[EvalRow]) -> dict[str, Any]:
    """Score ``rows`` and compute the report (a JSON-ready dict)."""
    verdicts = clf.classify([r.text for r in rows])
    topics = clf.topics
    report: dict[str, Any] = {"n": len(rows), "thresholds": dict(clf.thresholds), "topics": {}, "groups": {}}
    negatives = [(r, v) for r, v in zip(rows, verdicts) if r.topic is None]
    for t in topics:
        pos = [v for r, v in zip(rows, verdicts) if r.topic == t]
        fn = sum(t not in v.flagged_topics for v in pos)
        fp = sum(t in v.flagged_topics for _, v in negatives)
        report["topics"][t] = {"threshold": clf.thresholds[t], "positives": len(pos), "false_negatives": fn,
                               "fnr": _rate(fn, len(pos)), "negatives": len(negatives), "false_positives": fp,
                               "fpr": _rate(fp, len(negatives))}
    flagged_neg = sum(v.flagged for _, v in negatives)
    report["overall"] = {"negatives": len(negatives), "flagged": flagged_neg,
                         "fpr_any_topic": _rate(flagged_neg, len(negatives))}
    for name in GROUP_FIELDS:
        values = sorted({r.fields[name] for r in rows if name in r.fields})
        if values:
            report["groups"][name] = {v: _group([(r, x) for r, x in zip(rows, verdicts) if r.fields.get(name) == v])
                                      for v in values}
    labels = [*topics, NONE]
    counts = [[0] * len(labels) for _ in labels]
    for r, v in zip(rows, verdicts):
        counts[labels.index(r.topic or NONE)][labels.index(v.topic or NONE)] += 1
    report["confusion"] = {"labels": labels, "counts": counts, "rows": "true topic", "columns": "predicted topic"}
    report["errors"] = [{"text": r.text, "true": r.topic, "predicted": v.topic,
                         "scores": {k: round(s, 4) for k, s in v.scores.items()}, "terms": v.terms, **r.fields}
                        for r, v in zip(rows, verdicts) if _wrong(r, v)][:MAX_LISTED_ERRORS]
    # the model's probabilities, for the plot; dropped from JSON
    report["_scores"] = [(r.topic, v.scores) for r, v in zip(rows, verdicts)]
    return report


def _group(pairs: list[tuple[EvalRow, Classification]]) -> dict[str, Any]:
    pos = [(r, v) for r, v in pairs if r.topic is not None]
    neg = [v for r, v in pairs if r.topic is None]
    fn = sum(r.topic not in v.flagged_topics for r, v in pos)
    fp = sum(v.flagged for v in neg)
    by_topic = {}
    for t in sorted({r.topic for r, _ in pos}):
        mine = [v for r, v in pos if r.topic == t]
        by_topic[t] = {"positives": len(mine), "fnr": _rate(sum(t not in v.flagged_topics for v in mine), len(mine))}
    return {"positives": len(pos), "fnr": _rate(fn, len(pos)), "negatives": len(neg), "fpr": _rate(fp, len(neg)),
            "by_topic": by_topic}


def _wrong(row: EvalRow, verdict: Classification) -> bool:
    if row.topic is None:
        return bool(verdict.flagged)
    return row.topic not in verdict.flagged_topics


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def to_markdown(report: dict[str, Any], title: str = "Prompt classifier evaluation") -> str:
    """The report as a Markdown page."""
    lines = [f"# {title}", "", f"{report['n']} prompts.", "",
             "| topic | threshold | positives | FNR | negatives | FPR |", "|---|---|---|---|---|---|"]
    for t, m in report["topics"].items():
        lines.append(f"| {t} | {m['threshold']:.4g} | {m['positives']} | {_pct(m['fnr'])} ({m['false_negatives']}) "
                     f"| {m['negatives']} | {_pct(m['fpr'])} ({m['false_positives']}) |")
    o = report["overall"]
    flagged = f"Negatives flagged for any topic: {_pct(o['fpr_any_topic'])} ({o['flagged']} of {o['negatives']})."
    lines += ["", flagged, ""]
    for name, groups in report["groups"].items():
        lines += [f"## By {name}", "", f"| {name} | positives | FNR | negatives | FPR (any topic) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {v} | {g['positives']} | {_pct(g['fnr'])} | {g['negatives']} | {_pct(g['fpr'])} |"
                  for v, g in groups.items()]
        lines.append("")
    labels, counts = report["confusion"]["labels"], report["confusion"]["counts"]
    lines += ["## Confusion (rows: true topic, columns: predicted)", "",
              "| true \\ predicted | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {a} | " + " | ".join(str(c) for c in row) + " |" for a, row in zip(labels, counts)]
    if report["errors"]:
        lines += ["", f"## Errors (first {MAX_LISTED_ERRORS})", ""]
        lines += [f"- true {e['true'] or NONE}, predicted {e['predicted'] or NONE}, probabilities {e['scores']}"
                  f"{', terms ' + str(e['terms']) if e.get('terms') else ''}: "
                  f"{json.dumps(e['text'][:200], ensure_ascii=False)}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def plot_histograms(report: dict[str, Any], path: str | Path) -> Path:
    """Per topic: histograms of the model's probability of it (logit scale) for its prompts, other topics'
    and negatives; a prompt flagged by a term may sit anywhere on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    topics = list(report["topics"])
    fig, axes = plt.subplots(1, len(topics), figsize=(5.5 * len(topics), 3.8), squeeze=False)
    bins = [x / 2 for x in range(-30, 31)]
    for ax, t in zip(axes[0], topics):
        groups = {f"{t} prompts": [], "other topics": [], "negatives": []}
        for truth, scores in report["_scores"]:
            key = f"{t} prompts" if truth == t else ("negatives" if truth is None else "other topics")
            groups[key].append(_logit(scores[t]))
        for (name, values), colour in zip(groups.items(), ("tab:red", "tab:orange", "tab:blue")):
            if values:
                ax.hist(values, bins=bins, alpha=0.55, color=colour, label=f"{name} ({len(values)})")
        ax.axvline(_logit(report["topics"][t]["threshold"]), color="black", linestyle="--", label="threshold")
        ax.set_yscale("log")
        ax.set_title(f"{t}: FNR {_pct(report['topics'][t]['fnr'])}, FPR {_pct(report['topics'][t]['fpr'])}")
        ax.set_xlabel(f"logit of P({t})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


def write_report(report: dict[str, Any], out_dir: str | Path, *, stem: str = "classifier_report") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "png": out / f"{stem}.png"}
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    paths["json"].write_text(json.dumps(public, indent=2, ensure_ascii=False), encoding="utf-8")
    paths["markdown"].write_text(to_markdown(report), encoding="utf-8")
    plot_histograms(report, paths["png"])
    return paths
