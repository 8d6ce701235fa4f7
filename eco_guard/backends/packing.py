"""Linear layers rewritten for CPU decoding: bfloat16 weights packed once for oneDNN, or int8 weights.

Decoding one token reads every weight once, so its time is the weights' size over the memory bandwidth.

A plain ``F.linear`` in bfloat16 re-lays out its weight on every call; on a CPU with AMX or AVX512-BF16 that
costs as much as the product itself when one token is decoded at a time. Packing the weight once (what
``torch.compile``'s freezing pass does, here without compiling) gives the same numbers about 1.5x faster.
Only for models this package loaded itself: packing replaces the model's ``nn.Linear`` modules.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(8, 4, bias=False).to(torch.bfloat16)
    >>> packed = PackedLinear.wrap(layer)
    >>> x = torch.randn(2, 8, dtype=torch.bfloat16)
    >>> packed is layer or torch.equal(packed(x), layer(x))
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from eco_guard.precision import native_bf16

__all__ = ["Int8Linear", "PackedLinear", "pack_linears", "quantize_linears"]


class PackedLinear(nn.Module):
    """``nn.Linear`` over a oneDNN-packed bfloat16 weight (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    @classmethod
    def wrap(cls, linear: nn.Linear) -> nn.Module:
        """A packed copy of ``linear``, or ``linear`` itself where packing is unavailable or not bfloat16."""
        if linear.weight.dtype != torch.bfloat16 or not native_bf16():
            return linear
        try:
            packed = cls(linear)
            probe = torch.zeros((1, linear.in_features), dtype=torch.bfloat16)
            packed(probe)
        except (AttributeError, RuntimeError):  # a torch build without these oneDNN ops
            return linear
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed bfloat16"


def _replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Put ``make(linear)`` in place of every ``nn.Linear`` of ``model`` (``make`` may return it unchanged)."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and (new := make(child)) is not child:
                setattr(parent, name, new)
                count += 1
    return count


def pack_linears(model: nn.Module) -> int:
    """Replace every bfloat16 ``nn.Linear`` of ``model`` by a :class:`PackedLinear`; returns how many."""
    return _replace_linears(model, PackedLinear.wrap)


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights, one scale per output row (symmetric, weight-only; inference only).

    Half the bytes of bfloat16 to read per decoded token. The product runs in the activations' precision
    through ATen's ``_weight_int8pack_mm`` CPU kernel (the one torchao's int8 weight-only mode calls on CPU), so
    no extra package is needed; the rounding error of a weight is at most half its row's scale.

    Example:
        >>> layer = torch.nn.Linear(8, 4, bias=False)
        >>> q = Int8Linear(layer)
        >>> x = torch.randn(2, 8)
        >>> bool((q(x) - layer(x)).abs().max() < 0.05)
        True
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            weight = linear.weight.detach().float()
            scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            quantized = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.register_buffer("weight_int8", quantized, persistent=False)
        self.register_buffer("scale", scale.to(linear.weight.dtype), persistent=False)
        self.bias = None if linear.bias is None else linear.bias.detach().to(self.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` (the output head too) by an :class:`Int8Linear`; returns how many."""
    return _replace_linears(model, Int8Linear)
