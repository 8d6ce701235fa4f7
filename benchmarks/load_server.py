"""Load on ``eco-guard serve``: throughput, latency and time to first token at several client concurrencies.

    .venv/bin/python benchmarks/load_server.py [--config CONFIG] [--requests 64] [--concurrency 1,4,16]
                                               [--max-tokens 16] [--max-concurrency N] [--max-queue N] [--fault]

Starts ``eco-guard serve`` (the embedded demo config unless ``--config``) on loopback in a subprocess, then
per concurrency level sends ``--requests`` chat completions with the ``openai`` async client (no client
retries, greedy): flagged and unflagged prompts in turn, half of them streamed. Measures requests/s, p50/p95
latency (to the last byte), p50 time to the first content token of the streamed ones, 429s and other errors.
Every reply is compared with the answer the first level (concurrency 1: sequential) gave for its prompt, so a
lost or mixed-up reply under load counts as ``mismatched``; the server's ``/metrics`` route counts say how
many requests the guard corrupted. The server is stopped (SIGTERM, drained) at the end.

``--fault``: after the load, a streamed chat completion whose server is SIGKILLed once the first content token
arrives (the client's error is recorded), then a fresh server and the same request again (it must succeed and
equal the sequential answer).

Last, with no server running, the same requests at the last client concurrency through a guard in this process,
built as the server builds it (``Guard.plan(...)``, then ``generate()``, or ``stream()`` for the streamed ones,
from a thread pool of that size): ``server / in-process`` is the server's requests/s over that one's.
Writes ``benchmarks/results/server.json`` and ``server.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import httpx
import openai

from eco_guard.config import load_config

RESULTS: Final = Path(__file__).parent / "results"
FLAGGED: Final = ("Who is Harry Potter?", "Who wrote the Harry Potter books?", "What is Hogwarts?")
UNFLAGGED: Final = ("What is the capital of France?", "How do I sort a list in Python?", "What is bread made of?")
PROMPTS: Final = tuple(p for pair in zip(FLAGGED, UNFLAGGED) for p in pair)  # flagged, unflagged, ...
START_TIMEOUT_S: Final = 300.0  # a first run trains the demo classifier (~2 min)
STOP_TIMEOUT_S: Final = 60.0
REQUEST_TIMEOUT_S: Final = 600.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(args: argparse.Namespace) -> Any:
    """``eco-guard serve`` in a subprocess; yields its base URL and process; SIGTERM (drain) on the way out."""
    port = _free_port()
    cmd = [sys.executable, "-m", "eco_guard.cli", "serve", *([args.config] if args.config else []),
           "--port", str(port), "--max-tokens-cap", str(max(args.max_tokens, 1))]
    if args.max_concurrency:
        cmd += ["--max-concurrency", str(args.max_concurrency)]
    if args.max_queue:
        cmd += ["--max-queue", str(args.max_queue)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"the server exited ({proc.returncode}):\n{log.read()[-3000:]}")
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not come up")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                time.sleep(0.5)
            yield url, proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _routes(url: str) -> dict[str, float]:
    """The guard's route counts from /metrics (``corrupted``, ``fallback``, ...)."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("eco_guard_routes_total{"):
            route = line.split('route="', 1)[1].split('"', 1)[0]
            out[route] = out.get(route, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _streamed(i: int) -> bool:
    """Request ``i`` is streamed every other round of prompts, so each prompt is asked both ways."""
    return (i // len(PROMPTS)) % 2 == 1


async def _one(client: openai.AsyncOpenAI, model: str, prompt: str, stream: bool, max_tokens: int) -> dict[str, Any]:
    """One chat completion: its text, latency and (streamed) time to the first content token, or its error."""
    messages = [{"role": "user", "content": prompt}]
    started, ttft = time.perf_counter(), None
    try:
        if stream:
            pieces = []
            chunks = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                          temperature=0, stream=True)
            async for chunk in chunks:
                text = chunk.choices[0].delta.content if chunk.choices else None
                if text:
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    pieces.append(text)
            text = "".join(pieces)
        else:
            reply = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                         temperature=0)
            text = reply.choices[0].message.content or ""
    except openai.RateLimitError:
        return {"prompt": prompt, "error": "429"}
    except openai.APIStatusError as exc:
        return {"prompt": prompt, "error": str(exc.status_code)}
    except openai.APIError as exc:  # connection errors, a stream ending in an error event
        return {"prompt": prompt, "error": type(exc).__name__}
    return {"prompt": prompt, "text": text, "latency_s": time.perf_counter() - started, "ttft_s": ttft,
            "stream": stream}


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _level(url: str, model: str, concurrency: int, n: int, max_tokens: int) -> tuple[dict[str, Any], list]:
    client = _client(url)
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int) -> dict[str, Any]:
        async with gate:
            return await _one(client, model, PROMPTS[i % len(PROMPTS)], _streamed(i), max_tokens)
    started = time.perf_counter()
    results = await asyncio.gather(*(gated(i) for i in range(n)))
    wall = time.perf_counter() - started
    await client.close()
    ok = [r for r in results if "error" not in r]
    errors: dict[str, int] = {}
    for r in results:
        if "error" in r and r["error"] != "429":
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    latencies = [r["latency_s"] for r in ok]
    ttfts = [r["ttft_s"] for r in ok if r["stream"] and r["ttft_s"] is not None]
    row = {"concurrency": concurrency, "requests": n, "ok": len(ok),
           "rate_limited_429": sum(r.get("error") == "429" for r in results), "errors": errors,
           "wall_s": wall, "requests_per_s": len(ok) / wall if wall else None,
           "latency_p50_s": _quantile(latencies, 0.5), "latency_p95_s": _quantile(latencies, 0.95),
           "ttft_p50_s": _quantile(ttfts, 0.5), "streamed": sum(r["stream"] for r in ok)}
    return row, results


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)


async def _killed_mid_stream(url: str, model: str, proc: subprocess.Popen, max_tokens: int) -> dict[str, Any]:
    """Stream ``PROMPTS[0]``, SIGKILL the server at its first content token, and say what the client got."""
    client, pieces, error = _client(url), [], None
    try:
        chunks = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[0]}],
                                                      max_tokens=max_tokens, temperature=0, stream=True)
        async for chunk in chunks:
            text = chunk.choices[0].delta.content if chunk.choices else None
            if text:
                pieces.append(text)
                if len(pieces) == 1:
                    proc.kill()
                    proc.wait()
    except Exception as exc:  # noqa: BLE001 - whatever the client raises is the measurement
        cause = f" (from {type(exc.__cause__).__module__}.{type(exc.__cause__).__qualname__}: {exc.__cause__})"
        error = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}{cause if exc.__cause__ else ''}"
    finally:
        await client.close()
    return {"prompt": PROMPTS[0], "killed": proc.returncode == -signal.SIGKILL, "pieces_before_error": len(pieces),
            "client_error": error}


async def _retried(url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    client = _client(url)
    try:
        return await _one(client, model, prompt, True, max_tokens)
    finally:
        await client.close()


def _in_process(config: str | None, concurrency: int, n: int, max_tokens: int) -> tuple[float, list[str]]:
    """Requests/s and replies of the same mix through a guard in this process, ``concurrency`` threads."""
    from eco_guard.guard import Guard

    guard = Guard.from_config(load_config(config))

    def one(i: int) -> str:
        answer = guard.plan([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_new_tokens=max_tokens,
                            do_sample=False)
        return "".join(e.text for e in answer.stream()) if _streamed(i) else answer.generate().text
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(len(PROMPTS))))  # warm-up, not counted
        started = time.perf_counter()
        texts = list(pool.map(one, range(n)))
        return n / (time.perf_counter() - started), texts


def _mismatched(results: list[dict[str, Any]], reference: dict[str, str]) -> int:
    return sum(1 for r in results if "text" in r and r["text"] != reference.get(r["prompt"]))


def to_markdown(report: dict[str, Any]) -> str:
    def s(v: float | None, scale: float = 1.0, fmt: str = ".2f") -> str:
        return "n/a" if v is None else format(v * scale, fmt)
    setup = (f"{report['requests']} chat completions per level, max_tokens {report['max_tokens']} (greedy), "
             f"flagged and unflagged prompts in turn, half streamed; server: {report['server']}; {report['cpus']} "
             f"CPUs, load average {report['loadavg_before']} before, {report['loadavg_after']} after.")
    header = ("| client concurrency | ok | req/s | p50 latency (s) | p95 latency (s) | p50 TTFT, streamed (s) "
              "| 429 | errors | mismatched |")
    lines = [f"# eco-guard serve under load ({report['config']})", "", setup, "", header,
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["levels"]:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        lines.append(f"| {r['concurrency']} | {r['ok']}/{r['requests']} | {s(r['requests_per_s'])} | "
                     f"{s(r['latency_p50_s'])} | {s(r['latency_p95_s'])} | {s(r['ttft_p50_s'], fmt='.3f')} | "
                     f"{r['rate_limited_429']} | {errors} | {r['mismatched']} |")
    routes = ", ".join(f"{k} {v:g}" for k, v in sorted(report["routes"].items()))
    note = (f"Guard routes over the run (from /metrics): {routes}. `mismatched`: replies that differ from the "
            "sequential (concurrency 1) answer to the same prompt.")
    lines += ["", note, ""]
    ref = report["in_process"]
    lines += [(f"In-process guard (no server running), same prompt mix at concurrency {ref['concurrency']}: "
               f"{s(ref['requests_per_s'])} req/s, {ref['mismatched']} mismatched; server / in-process = "
               f"{s(ref['server_over_in_process'])}."), ""]
    if (f := report.get("fault")) is not None:
        got = f"`{f['client_error']}`" if f["client_error"] else "no error"
        retry = "succeeded" if f["retry_ok"] else f"failed ({f['retry_error']})"
        same = "equals" if f["retry_matches"] else "differs from"
        lines += [(f"Fault run: the server was SIGKILLed after {f['pieces_before_error']} streamed content "
                   f"piece(s) of `{f['prompt']}`; the client got {got}. On a fresh server the same request "
                   f"{retry} and {same} the sequential answer."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="YAML config (default: the embedded demo config)")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,4,16", help="client concurrency levels; the first is the reference")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-concurrency", type=int, default=None, help="server generation threads (default: config)")
    ap.add_argument("--max-queue", type=int, default=None, help="server admission queue (default: config)")
    ap.add_argument("--fault", action="store_true", help="also SIGKILL a server mid-stream, then retry on a new one")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    loadavg_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    fault = None
    with running_server(args) as (url, proc):
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        asyncio.run(_level(url, model, 1, len(PROMPTS), args.max_tokens))  # warm-up, not counted
        before = _routes(url)
        rows, reference = [], {}
        for concurrency in levels:
            row, results = asyncio.run(_level(url, model, concurrency, args.requests, args.max_tokens))
            if not reference:
                reference = {r["prompt"]: r["text"] for r in results if "text" in r}
            row["mismatched"] = _mismatched(results, reference)
            rows.append(row)
            print(f"concurrency {concurrency:>3}: {row['ok']}/{row['requests']} ok, {row['requests_per_s']:.2f} req/s, "
                  f"p50 {row['latency_p50_s']:.2f} s, p95 {row['latency_p95_s']:.2f} s, TTFT p50 "
                  f"{row['ttft_p50_s'] or float('nan'):.3f} s, 429 {row['rate_limited_429']}, errors "
                  f"{sum(row['errors'].values())}, mismatched {row['mismatched']}", flush=True)
        after = _routes(url)
        if args.fault:
            fault = asyncio.run(_killed_mid_stream(url, model, proc, args.max_tokens))
    if fault is not None:
        with running_server(args) as (url, _):
            retry = asyncio.run(_retried(url, model, fault["prompt"], args.max_tokens))
        fault |= {"retry_ok": "text" in retry, "retry_error": retry.get("error"),
                  "retry_matches": retry.get("text") == reference.get(fault["prompt"])}
        print(f"fault: {fault}", flush=True)
    rate, texts = _in_process(args.config, levels[-1], args.requests, args.max_tokens)
    in_process = {"concurrency": levels[-1], "requests": args.requests, "requests_per_s": rate,
                  "mismatched": sum(t != reference.get(PROMPTS[i % len(PROMPTS)]) for i, t in enumerate(texts)),
                  "server_over_in_process": (rows[-1]["requests_per_s"] or 0.0) / rate}
    print(f"in-process: {in_process}", flush=True)
    configured = load_config(args.config).server
    server = (f"max_concurrency {args.max_concurrency or configured.max_concurrency}, "
              f"max_queue {args.max_queue or configured.max_queue}")
    report = {"config": args.config or "embedded demo", "requests": args.requests, "max_tokens": args.max_tokens,
              "server": server, "cpus": os.cpu_count(), "loadavg_before": loadavg_before,
              "loadavg_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
              "routes": {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}, "levels": rows,
              "in_process": in_process, "fault": fault}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "server.md").write_text(to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
