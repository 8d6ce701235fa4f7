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
    from eco_guard.guard import Guard, GuardRequest

    started = time.perf_counter()
    print("Loading the model and the classifier (the first run trains the classifier, ~1-2 min)...", flush=True)
    guard = Guard.from_config(args.config)
    prompts = args.prompt or _demo_prompts()
    params = guard.params(max_new_tokens=args.max_new_tokens)
    width = 44
    print(f"\nForget topics: {', '.join(t.name for t in guard.config.topics)}   model: {guard.backend.name}\n")
    header = f"{'prompt':<28} | {'plain answer':<{width}} | {'ECO answer':<{width}}"
    print(header)
    print("-" * len(header))
    for prompt in prompts:
        routed = guard.route(GuardRequest.of(prompt))
        plain = guard.backend.generate([routed.prompt], None, params)[0].text
        d = routed.decision
        if routed.plan is not None:
            eco = guard.backend.generate([routed.prompt], [routed.plan], params)[0].text
            tokens = guard.backend.tokenizer.convert_ids_to_tokens(
                [t for t, m in zip(routed.prompt.input_ids, routed.plan.mask) if m])
            note = f"[{d.topic} p={d.score:.2f}; corrupted {d.corrupted_tokens}: {' '.join(tokens)}]"
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


# ---------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eco-guard", description="Unlearning guardrail by embedding-corrupted prompts.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo(subparsers)
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
