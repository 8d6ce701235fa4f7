"""The ``eco-guard`` command.

    eco-guard demo [--config CONFIG]        side-by-side: plain vs ECO answers
    eco-guard train CONFIG                  train and calibrate the prompt classifier
    eco-guard classify CONFIG INPUT.jsonl   score prompts
    eco-guard eval-classifier CONFIG DATA   FNR/FPR report with plots
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from eco_guard.errors import EcoGuardError

__all__ = ["build_parser", "main"]


# ---------------------------------------------------------------- demo

def _demo_prompts() -> list[str]:
    path = Path(__file__).parent / "data" / "demo" / "prompts.txt"
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _cell(text: str, width: int) -> list[str]:
    return textwrap.wrap(" ".join(text.split()), width) or [""]


def _run_demo(args: argparse.Namespace) -> int:
    from eco_guard.guard import Guard

    started = time.perf_counter()
    print("Loading the model and the classifier (the first run trains the classifier, ~1-2 min)...", flush=True)
    guard = Guard.from_config(args.config)
    prompts = args.prompt or _demo_prompts()
    width = 44
    print(f"\nForget topics: {', '.join(t.name for t in guard.config.topics)}   model: {guard.model_name}\n")
    header = f"{'prompt':<28} | {'plain answer':<{width}} | {'ECO answer':<{width}}"
    print(header)
    print("-" * len(header))
    for prompt in prompts:
        answer = guard.plan(prompt, max_new_tokens=args.max_new_tokens)
        plain = guard.unguarded(prompt, max_new_tokens=args.max_new_tokens).generate().text
        d = answer.decision
        if answer.route == "corrupted":
            eco = answer.generate().text
            pieces = "|".join(p.strip() for p in answer.corrupted_pieces())
            note = f"[{d.topic} p={d.score:.2f}; corrupted {d.corrupted_tokens}: {pieces}]"
        else:
            eco = plain
            note = f"[not flagged, p={d.score:.2f}: plain generation]"
        left, mid, right = _cell(prompt, 28), _cell(plain, width), _cell(f"{note} {eco}", width)
        for i in range(max(len(left), len(mid), len(right))):
            row = [c[i] if i < len(c) else "" for c in (left, mid, right)]
            print(f"{row[0]:<28} | {row[1]:<{width}} | {row[2]:<{width}}")
        print("-" * len(header))
    print(f"\nDone in {time.perf_counter() - started:.1f} s.")
    return 0


def _add_demo(subparsers: Any) -> None:
    sp = subparsers.add_parser("demo", help="plain vs ECO answers, side by side, on the default model")
    sp.add_argument("--config", default=None, help="YAML config (default: the embedded demo config)")
    sp.add_argument("--max-new-tokens", type=int, default=40)
    sp.add_argument("prompt", nargs="*", help="prompts to try (default: the packaged demo prompts)")
    sp.set_defaults(func=_run_demo)


# ---------------------------------------------------------------- classifier

def _run_train(args: argparse.Namespace) -> int:
    from eco_guard.classifier import PromptClassifier
    from eco_guard.config import load_config

    cfg = load_config(args.config)
    started = time.perf_counter()
    clf = PromptClassifier.from_config(cfg, retrain=True, progress=not args.quiet)
    print(f"trained in {time.perf_counter() - started:.0f} s; saved to {cfg.classifier.path}")
    for topic, c in clf.metadata["calibration"].items():
        fnr = "n/a" if c["holdout_fnr"] is None else f"{100 * c['holdout_fnr']:.1f}%"
        print(f"  {topic}: threshold {c['threshold']:.4g} ({c['source']}, target FPR {c['target_fpr']:g}); "
              f"calibration FPR {100 * c['calibration_fpr']:.1f}% on {c['n_negatives']} held-out negatives; "
              f"FNR {fnr} on {c['n_holdout_positives']} held-out positives")
    return 0


def _add_train(subparsers: Any) -> None:
    sp = subparsers.add_parser("train", help="train and calibrate the prompt classifier of a config")
    sp.add_argument("config", help="YAML config; the classifier is written to its classifier.path")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=_run_train)


def _run_classify(args: argparse.Namespace) -> int:
    import json

    from tqdm.auto import tqdm

    from eco_guard.classifier import PromptClassifier, read_rows
    from eco_guard.config import load_config

    clf = PromptClassifier.from_config(load_config(args.config), progress=True)
    texts = [row["text"] for row in read_rows(args.input)]
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115 - or stdout
    try:
        for start in tqdm(range(0, len(texts), args.batch_size), desc="classifying", disable=not args.output):
            batch = texts[start:start + args.batch_size]
            for text, v in zip(batch, clf.classify(batch)):
                # the decision, the model's probabilities, and the lexicon's evidence, side by side
                line = {"text": text, "flagged": v.flagged, "topic": v.topic, "flagged_topics": list(v.flagged_topics),
                        "score": v.score, "scores": v.scores, "terms": v.terms, "weak_terms": v.weak_terms,
                        "contrast": v.contrast, "thresholds": v.thresholds}
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _add_classify(subparsers: Any) -> None:
    sp = subparsers.add_parser("classify", help="classify the prompts of a JSONL/CSV file (a 'text' field per row): "
                               "decision, model probabilities ('scores') and the terms found")
    sp.add_argument("config", help="YAML config (trains the classifier first if it is missing)")
    sp.add_argument("input", help="JSONL or CSV with a 'text' field")
    sp.add_argument("-o", "--output", help="output JSONL (default: stdout)")
    sp.add_argument("--batch-size", type=int, default=256)
    sp.set_defaults(func=_run_classify)


def _run_eval_classifier(args: argparse.Namespace) -> int:
    from eco_guard.classifier import PromptClassifier
    from eco_guard.config import load_config
    from eco_guard.eval.classifier_report import evaluate, load_eval_rows, to_markdown, write_report

    clf = PromptClassifier.from_config(load_config(args.config), progress=True)
    report = evaluate(clf, load_eval_rows(args.data, clf.topics))
    paths = write_report(report, args.out)
    print(to_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _add_eval_classifier(subparsers: Any) -> None:
    sp = subparsers.add_parser("eval-classifier", help="FNR/FPR per topic and per style/kind/split, with plots")
    sp.add_argument("config", help="YAML config")
    sp.add_argument("data", nargs="+", help="labelled JSONL/CSV: a 'topic' field, or 'label' 0/1 "
                    "(1: the topic named in the file's path)")
    sp.add_argument("--out", default="classifier-eval", help="folder for the report (.json, .md, .png)")
    sp.set_defaults(func=_run_eval_classifier)


def _run_suggest_terms(args: argparse.Namespace) -> int:
    from eco_guard.classifier import TrainingData, suggest_terms
    from eco_guard.config import load_config

    data = TrainingData.from_config(load_config(args.config))
    positives = {t: p + data.train_only_positives[t] for t, p in data.positives.items()}
    for topic, names in suggest_terms(positives, data.negatives + data.train_only_negatives, data.terms).items():
        print(f"{topic}: {len(names)} candidate terms (prompts naming it; review before adding)")
        for name, n in names[:args.top]:
            print(f"  {n:4d}  {name}")
    return 0


def _add_suggest_terms(subparsers: Any) -> None:
    sp = subparsers.add_parser("suggest-terms", help="names in a topic's prompts that its terms miss "
                               "and no negative or other topic uses")
    sp.add_argument("config", help="YAML config")
    sp.add_argument("--top", type=int, default=40, help="candidates shown per topic")
    sp.set_defaults(func=_run_suggest_terms)


# ---------------------------------------------------------------- server

_SERVE_FLAGS = {"host": "--host", "port": "--port", "api_key_env": "--api-key-env",
                "expose_decision": "--expose-decision", "enable_prompt_embeds": "--enable-prompt-embeds",
                "max_concurrency": "--max-concurrency", "max_queue": "--max-queue",
                "max_tokens_cap": "--max-tokens-cap", "request_timeout_s": "--request-timeout"}


def _serve_settings(server: Any, args: argparse.Namespace) -> Any:
    """The config's ``server:`` block with the flags given on the command line laid over it."""
    from pydantic import ValidationError

    from eco_guard.config import ServerSettings
    from eco_guard.errors import ConfigError

    given = {k: getattr(args, k) for k in _SERVE_FLAGS if getattr(args, k) is not None}
    try:
        return ServerSettings.model_validate({**server.model_dump(), **given})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        raise ConfigError(f"{_SERVE_FLAGS.get(key, key)}: {err['msg']} (got {err.get('input')!r})") from None


def _run_serve(args: argparse.Namespace) -> int:
    from eco_guard.config import load_config
    from eco_guard.guard import Guard
    from eco_guard.server import serve

    cfg = load_config(args.config)
    settings = _serve_settings(cfg.server, args)
    settings.api_key()  # an unset token variable fails before the model loads
    serve(Guard.from_config(cfg), settings)
    return 0


def _add_serve(subparsers: Any) -> None:
    sp = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat and text completions, metrics); "
                               "the config's server: block, overridden by the flags given")
    sp.add_argument("config", nargs="?", default=None, help="YAML config (default: the embedded demo config)")
    sp.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    sp.add_argument("--port", type=int, help="TCP port (default 8000; 0: any free port)")
    sp.add_argument("--api-key-env", help="environment variable holding the bearer token required")
    sp.add_argument("--expose-decision", action="store_true", default=None, help="add the guard's decision to replies")
    sp.add_argument("--enable-prompt-embeds", action="store_true", default=None,
                    help="accept vLLM-style prompt_embeds on /v1/completions (unclassified: trusted callers only)")
    sp.add_argument("--max-concurrency", type=int, help="generations running at once (default 16)")
    sp.add_argument("--max-queue", type=int, help="requests admitted at once; more get 429 (default 64)")
    sp.add_argument("--max-tokens-cap", type=int, help="largest max_tokens a request may ask for (default 512)")
    sp.add_argument("--request-timeout", dest="request_timeout_s", type=float,
                    help="seconds before a completion gets 504 (default 120)")
    sp.set_defaults(func=_run_serve)


# ---------------------------------------------------------------- learned corruption

def _run_optimize(args: argparse.Namespace) -> int:
    from eco_guard.optimize import optimize_config

    started = time.perf_counter()
    path, results = optimize_config(args.config, topics=args.topic or None, steps=args.steps,
                                    methods=args.methods.split(","), modes=args.modes.split(","),
                                    dims=[int(d) for d in args.dims.split(",")], target_hit_rate=args.target,
                                    max_fluency_ratio=args.max_fluency, max_repetition=args.max_repetition,
                                    report_dir=args.report,
                                    progress=not args.quiet)
    for name, r in results.items():
        b, m = r.best, r.best.measurement
        print(f"{name}: {b.method} dims {b.dims} strength {b.strength:g} selection {b.mode}: hit rate "
              f"{m.hit_rate:.0%} of {r.n_known} known (target {r.target_hit_rate:.0%}), fluency ratio "
              f"{m.fluency_ratio:.2f} (within 1/{r.max_fluency_ratio:g} to {r.max_fluency_ratio:g})"
              f"{'' if b.reached else '  TARGET NOT REACHED'}")
    print(f"wrote {path} and its report in {time.perf_counter() - started:.0f} s")
    return 0


def _add_optimize(subparsers: Any) -> None:
    sp = subparsers.add_parser("optimize", help="learn the corruption of 'corruption: learned' topics and store it")
    sp.add_argument("config", help="YAML config; the store is written to its 'store' (default <config>.eco.json)")
    sp.add_argument("--topic", action="append", help="learn this topic (repeatable; default: every learned topic)")
    sp.add_argument("--steps", type=int, default=12, help="zeroth-order steps per candidate")
    sp.add_argument("--methods", default="rand_noise_first_n,zero_out_top_k,flip_sign_top_k")
    sp.add_argument("--modes", default="content,keywords", help="token selection modes to try")
    sp.add_argument("--dims", default="1", help="comma-separated dims to try")
    sp.add_argument("--target", type=float, default=0.1, help="hit rate to reach on the known questions")
    sp.add_argument("--max-fluency", type=float, default=2.0,
                    help="the replies' perplexity ratio (read as text) must lie within 1/X to X")
    sp.add_argument("--max-repetition", type=float, default=0.1,
                    help="repeated bigrams allowed above the plain replies' own share")
    sp.add_argument("--report", help="folder for optimize.md and optimize.png (default: <store>-report beside it)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=_run_optimize)


# ---------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eco-guard",
                                     description="Unlearning guardrail by embedding-corrupted prompts.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo(subparsers)
    _add_train(subparsers)
    _add_classify(subparsers)
    _add_eval_classifier(subparsers)
    _add_suggest_terms(subparsers)
    _add_optimize(subparsers)
    _add_serve(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EcoGuardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
