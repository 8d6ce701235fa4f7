"""The decoding kernels of ``native.c``: built on first use with the system C compiler, cached, optional.

Decoding one token reads every weight once, so a decoding step can be no faster than reading the weights. For
one row, the CPU product kernels torch ships fall short of that (oneDNN's packed bfloat16 product: 1.2x the time
of a plain sum of the same bytes on one thread, 1.35x on two), and a step in torch adds ~40 small operations a
layer. ``native.c`` holds one-row products that read each weight once in the layout eco-guard keeps it in
(bfloat16, float32 transposed, int8), as fast as the sum, and the whole Llama decoding step in one call
(:class:`~eco_guard.backends.decode_step.NativeLlamaStep`). Numbers: ``benchmarks/README.md``, Backend.

It needs an x86-64 CPU with AVX512-BF16 and AVX512-VNNI, a C compiler (``$CC``, else ``cc``) and torch's OpenMP
runtime (libgomp, which the compiled library shares with torch: one thread pool, the thread count torch gives the
calling thread). Where any is missing, or ``ECO_GUARD_KERNELS=torch`` is set, :func:`kernels` is ``None`` and
every precision decodes on torch's kernels as it would without this module. The library is compiled once per source into
``<cache>/kernels/`` (``$ECO_GUARD_CACHE``; about a second).

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(64, 8, bias=False).to(torch.bfloat16)
    >>> fast = NativeLinear.wrap(layer)
    >>> x = torch.randn(1, 64, dtype=torch.bfloat16)
    >>> fast is layer or bool(torch.allclose(fast(x).float(), layer(x).float(), rtol=0.02, atol=0.02))
    True
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Final

import torch
from torch import nn

__all__ = ["NativeLinear", "kernels"]

log = logging.getLogger(__name__)

_ABI: Final = 4  # eco_abi_version() of the source this module calls
_SOURCE: Final = Path(__file__).with_name("native.c")
_FLAGS: Final = ("-O3", "-mprefer-vector-width=512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
                  "-mavx512vnni", "-fopenmp", "-shared", "-fPIC")


def _cpu_supported() -> bool:
    """Whether this is an x86-64 Linux CPU with the instructions ``native.c`` uses (AVX512-BF16 and -VNNI)."""
    if platform.system() != "Linux" or platform.machine() not in {"x86_64", "AMD64"}:
        return False
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return {"avx512_bf16", "avx512_vnni", "avx512bw", "avx512vl"} <= set(flags.split())


def _build(target: Path) -> None:
    """Compile ``native.c`` into ``target`` (written under a temporary name, then moved: processes may race)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or $CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"], check=True,
                       capture_output=True, timeout=120)
        os.replace(built, target)
    for stale in target.parent.glob("native-*.so"):  # builds of earlier sources
        if stale != target:
            stale.unlink(missing_ok=True)


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The compiled kernels, or ``None`` where this CPU, this machine or ``ECO_GUARD_KERNELS`` rules them out."""
    if os.environ.get("ECO_GUARD_KERNELS", "native").lower() in {"torch", "0", "off", "none"}:
        return None
    if not _cpu_supported():
        return None
    from eco_guard.config import default_cache_dir

    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:16]
    target = default_cache_dir() / "kernels" / f"native-{digest}.so"
    try:
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
        if lib.eco_abi_version() != _ABI:
            raise OSError(f"{target} is not the kernel this eco-guard calls")
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("native kernels unavailable, decoding with torch's: %s %s", exc, detail.decode(errors="replace"))
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.eco_bf16_linear.argtypes = [p, p, p, p, i64, i64, i64]
    lib.eco_bf16_linear.restype = None
    lib.eco_llama_step.argtypes = [p, ctypes.POINTER(Layer), i64, p, p, p, p, p, p, p, ctypes.POINTER(Shape)]
    lib.eco_llama_step.restype = None
    return lib


class Layer(ctypes.Structure):
    """``eco_layer``: one decoder layer's weights and its KV-cache buffers."""

    _fields_ = [(name, ctypes.c_void_p) for name in
                ("input_norm", "qkv", "o", "post_norm", "gate_up", "down", "qkv_scale", "o_scale", "gate_up_scale",
                 "down_scale", "keys", "values")]


class Shape(ctypes.Structure):
    """``eco_shape``: the sizes of one decoding step."""

    _fields_ = [*[(name, ctypes.c_int64) for name in
                  ("rows", "hidden", "intermediate", "q_heads", "kv_heads", "head_dim", "vocab", "column", "columns",
                   "mask_stride", "precision", "weights")], ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


def _bound(kernel, weight: int, bias: int, n: int, k: int):
    """``kernel`` with a layer's fixed arguments bound: ``call(x, y, m)``."""
    def call(x: int, y: int, m: int) -> None:
        kernel(x, weight, bias, y, m, n, k)

    return call


class NativeLinear(nn.Module):
    """``nn.Linear`` in bfloat16 whose one-row products run on ``native.c`` (inference only).

    The weight stays ``nn.Linear``'s ``(out, in)`` matrix, so a fused projection's parts are row views of it
    (:meth:`rows`). Several rows at once are compute-bound, where oneDNN's blocked kernels win (all of
    SmolLM2's products for 16 rows: 27 ms packed against 78 ms here): they go to ``batched`` (a packed copy,
    :class:`~eco_guard.backends.packing.PackedLinear`) where one is given, else to ``F.linear``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batched: nn.Module | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight, persistent=False)
        self.bias = bias
        self.batched = batched
        # what each call passes, fixed once: a decoding step makes ~120 of these calls, and per-call Python
        # work (attribute look-ups, pointer queries) showed as ~20 us each
        self._call = _bound(kernels().eco_bf16_linear, weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                            self.out_features, self.in_features)

    @classmethod
    def wrap(cls, linear: nn.Linear, batched: nn.Module | None = None) -> nn.Module:
        """A native layer over ``linear``'s weight (shared, not copied), or ``linear`` itself where the kernel
        cannot run it; ``batched`` computes the same layer for several rows."""
        weight = linear.weight.detach()
        if weight.dtype != torch.bfloat16 or linear.in_features % 32 or kernels() is None:
            return linear
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        return cls(weight.contiguous(), bias, batched)

    def rows(self, start: int, end: int) -> NativeLinear:
        """The layer of outputs ``start:end``, its weight a view of this one's (several rows: ``F.linear``)."""
        return NativeLinear(self.weight[start:end], None if self.bias is None else self.bias[start:end])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] != 1 or x.dtype != torch.bfloat16 or x.requires_grad:
            return self.batched(x) if self.batched is not None else nn.functional.linear(x, self.weight, self.bias)
        flat = flat.contiguous()
        y = torch.empty((1, self.out_features), dtype=torch.bfloat16)
        self._call(flat.data_ptr(), y.data_ptr(), 1)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        batched = "oneDNN" if self.batched is not None else "F.linear"
        return f"in_features={self.in_features}, out_features={self.out_features}, bfloat16 native (rows: {batched})"
