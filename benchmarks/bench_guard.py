"""Overhead of the guard over plain generation, and the memory of one process holding everything.

    .venv/bin/python benchmarks/bench_guard.py [--config CONFIG] [--repeats 5] [--tokens 64]

Measures, in one run and interleaved (so background load hits both sides alike):
- unflagged prompts: ``guard.invoke`` (classify + route + plain generation) vs the backend's plain
  generation of the same prompt; target ratio <= 1.03;
- flagged prompts: ``guard.invoke`` (classify + route + corrupted generation) vs plain generation;
  target ratio <= 1.05;
- peak resident memory of this process holding the default model, the classifier and the guard
  (target <= 1.5 GB).
Writes ``benchmarks/results/guard.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tqdm import tqdm  # noqa: E402

from eco_guard.guard import Guard  # noqa: E402

UNFLAGGED = ["What is the capital of France?", "How do I sort a list in Python?", "Who was Harry Houdini?"]
FLAGGED = ["Who is Harry Potter?", "Who wrote the Harry Potter books?", "What is Hogwarts?"]
RESULTS = Path(__file__).parent / "results"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(guard: Guard, prompts: list[str], repeats: int, tokens: int, want_flagged: bool) -> dict:
    backend = guard.backend
    params = guard.params(max_new_tokens=tokens, ignore_eos=True)
    guarded, plain = [], []
    for prompt in prompts:
        decision = guard.invoke(prompt, max_new_tokens=1).decision
        if decision.flagged is not want_flagged:
            print(f"  note: {prompt!r} routed {decision.route}, expected flagged={want_flagged}", file=sys.stderr)
    for _ in tqdm(range(repeats), desc=f"{'flagged' if want_flagged else 'unflagged'} x{len(prompts)}"):
        for prompt in prompts:
            prepared = backend.prepare([{"role": "user", "content": prompt}])
            plain.append(timed(lambda prepared=prepared: backend.generate([prepared], None, params)))
            guarded.append(timed(lambda prompt=prompt: guard.invoke(prompt, max_new_tokens=tokens, ignore_eos=True)))
    g, p = statistics.median(guarded), statistics.median(plain)
    return {"guarded_s": g, "plain_s": p, "ratio": g / p, "samples": len(guarded)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args(argv)

    started = time.perf_counter()
    guard = Guard.from_config(args.config)
    load_s = time.perf_counter() - started
    guard.invoke("warm up", max_new_tokens=2)
    unflagged = measure(guard, UNFLAGGED, args.repeats, args.tokens, want_flagged=False)
    flagged = measure(guard, FLAGGED, args.repeats, args.tokens, want_flagged=True)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux
    report = {
        "config": args.config or "embedded demo",
        "tokens": args.tokens,
        "repeats": args.repeats,
        "load_s": load_s,
        "unflagged": unflagged,
        "flagged": flagged,
        "peak_rss_gb": peak_gb,
        "targets": {"unflagged_ratio": 1.03, "flagged_ratio": 1.05, "peak_rss_gb": 1.5},
        "cpu_threads": os.cpu_count(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "guard.json").write_text(json.dumps(report, indent=2))
    print(f"\n{'case':<12} {'guarded s':>10} {'plain s':>10} {'ratio':>7} {'target':>7}")
    for name, row, target in [("unflagged", unflagged, 1.03), ("flagged", flagged, 1.05)]:
        print(f"{name:<12} {row['guarded_s']:>10.3f} {row['plain_s']:>10.3f} {row['ratio']:>7.3f} {target:>7.2f}")
    print(f"peak RSS: {peak_gb:.2f} GB (target 1.5)   guard load: {load_s:.1f} s")
    print(f"written: {RESULTS / 'guard.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
