"""How the guard's torch work shares the CPU: the decoder on all cores, everything else on one.

One reply is one prompt classification (a few milliseconds) and dozens of decoding steps, so the decoding worker
(:class:`~eco_guard.backends.batching.DecodeScheduler`) gets every core and the calling threads' own work (the
classifier's forward pass) runs on one. OpenMP's and MKL's thread counts are per thread in torch, so the worker's
count does not change the callers'.

The second reason is libgomp (the OpenMP runtime torch ships on Linux). It counts every idle pooled thread in
the process, and once there are more than cores, every team stops spinning at its barriers and sleeps on a futex
instead. A caller that once ran a two-thread operation (loading the model, say) keeps a pooled thread, and
two-thread decoding then ran 1.7x slower on 2 cores (bfloat16: 23 against 40 tokens/s;
``benchmarks/README.md``). So callers classify on one thread (no pool), and :func:`release_idle_threads` frees
the pool the loading thread made.

Example:
    >>> import torch
    >>> before = torch.get_num_threads()
    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["default_decode_threads", "release_idle_threads", "torch_threads"]

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep what is cheap to keep


def default_decode_threads() -> int:
    """The decoding worker's thread count when the config names none: ``OMP_NUM_THREADS`` if set, else
    the cores this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads on this thread, then restore its count (``None``: as is)."""
    before = torch.get_num_threads()
    if not n or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded, where it ships one beside itself (Linux wheels: libgomp)."""
    lib = Path(torch.__file__).parent / "lib"
    for candidate in sorted(lib.glob("libgomp*.so*")) + sorted(lib.glob("libomp*.so*")):
        try:
            runtime = ctypes.CDLL(str(candidate))
            runtime.omp_pause_resource_all.argtypes = [ctypes.c_int]
            return runtime
        except (OSError, AttributeError):
            continue
    return None


def release_idle_threads() -> bool:
    """Free the calling thread's idle OpenMP workers (the next multi-threaded operation on it makes new ones).

    Returns whether a runtime did so; ``False`` where torch ships none beside itself or this one cannot.
    """
    runtime = _openmp()
    return runtime is not None and runtime.omp_pause_resource_all(_OMP_PAUSE_SOFT) == 0
