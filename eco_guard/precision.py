"""Which floating-point precision to compute in on this machine (shared by the chat model and classifier training).

Example:
    >>> resolved_precision("float32")
    'float32'
    >>> resolved_precision("auto") in {"bfloat16", "float32"}
    True
"""

from __future__ import annotations

import torch

__all__ = ["native_bf16", "resolved_precision"]


def native_bf16() -> bool:
    """Whether oneDNN has native bfloat16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def resolved_precision(precision: str) -> str:
    """``auto`` resolved for this CPU: bfloat16 where oneDNN has native bf16 kernels, else float32.

    Any other value is returned unchanged.

    Example:
        >>> resolved_precision("bfloat16")
        'bfloat16'
    """
    if precision != "auto":
        return precision
    return "bfloat16" if native_bf16() else "float32"
