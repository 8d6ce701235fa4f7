"""bfloat16 linear layers with their weights packed once for oneDNN (the CPU's bf16 matrix kernels).

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

import torch
from torch import nn

from eco_guard.precision import native_bf16

__all__ = ["PackedLinear", "pack_linears"]


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


def pack_linears(model: nn.Module) -> int:
    """Replace every bfloat16 ``nn.Linear`` of ``model`` by a :class:`PackedLinear`; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                packed = PackedLinear.wrap(child)
                if packed is not child:
                    setattr(parent, name, packed)
                    count += 1
    return count
