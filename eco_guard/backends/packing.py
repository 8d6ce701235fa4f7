"""Linear layers rewritten for CPU decoding: float32 weights stored transposed, bfloat16 weights packed once
for oneDNN, or int8 weights; and each layer's q/k/v and gate/up projections fused into one product.

Decoding one token reads every weight once, so its time is the weights' size over the memory bandwidth, and
how close a kernel comes to it depends on the layout: MKL's one-row float32 product reads an ``(in, out)``
weight 1.3-2x faster than ``nn.Linear``'s ``(out, in)`` (SmolLM2's output head: 11.3 -> 5.0 ms), and one
product over a fused weight beats three small ones (all of SmolLM2's products, one token: float32 39 -> 34 ms,
int8 27.5 -> 20.4 ms, bfloat16 24 -> 22 ms).

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

__all__ = ["Int8Linear", "PackedLinear", "TransposedLinear", "decoding_layout", "fuse_projections", "pack_linears",
           "quantize_linears"]

# per decoder layer: (submodule, fused name, projections fused into it, in output order)
_FUSED = (("self_attn", "eco_qkv", ("q_proj", "k_proj", "v_proj")), ("mlp", "eco_gate_up", ("gate_proj", "up_proj")))


class TransposedLinear(nn.Module):
    """``nn.Linear`` over its float32 weight stored transposed, ``(in, out)``: the layout MKL's one-row product
    reads fastest (inference only). ``weight_t`` may be a column block of a larger matrix (a fused projection).

    Example:
        >>> layer = torch.nn.Linear(8, 4)
        >>> x = torch.randn(2, 8)
        >>> torch.allclose(TransposedLinear.wrap(layer)(x), layer(x))
        True
    """

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight_t.shape
        self.register_buffer("weight_t", weight_t, persistent=False)
        self.bias = bias

    @classmethod
    def wrap(cls, linear: nn.Linear) -> nn.Module:
        """A transposed copy of a float32 ``linear``; any other ``linear`` itself."""
        if linear.weight.dtype != torch.float32:
            return linear
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(linear.weight.detach().t().contiguous(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, transposed float32"


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


def fuse_projections(model: nn.Module) -> list[tuple[nn.Module, str, tuple[str, ...]]]:
    """Give each Llama-family decoder layer one ``nn.Linear`` per fused group (``self_attn.eco_qkv``,
    ``mlp.eco_gate_up``), its weight the projections' weights stacked; the projections' weights become views of it.

    Returns the groups ``(parent, fused name, projection names)`` for :func:`share_fused` after a conversion.
    The model's own forward ignores the fused layers; :class:`~eco_guard.backends.decode_step.LlamaDecodeStep`
    uses them.
    """
    groups = []
    for layer in getattr(getattr(model, "model", None), "layers", None) or []:
        for sub, fused_name, names in _FUSED:
            parent = getattr(layer, sub, None)
            parts = [getattr(parent, n, None) for n in names]
            if not all(type(p) is nn.Linear for p in parts):
                continue
            weight = torch.cat([p.weight.detach() for p in parts])
            fused = nn.Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None,
                              dtype=weight.dtype, device=weight.device)
            with torch.no_grad():
                fused.weight.copy_(weight)
                if fused.bias is not None:
                    fused.bias.copy_(torch.cat([p.bias.detach() for p in parts]))
            fused.requires_grad_(False)
            start = 0
            for p in parts:  # views of the fused weight: stored once until a conversion copies them
                p.weight = nn.Parameter(fused.weight[start : start + p.out_features], requires_grad=False)
                start += p.out_features
            setattr(parent, fused_name, fused)
            groups.append((parent, fused_name, names))
    return groups


def share_fused(groups: list[tuple[nn.Module, str, tuple[str, ...]]]) -> None:
    """Point each projection's weight into its fused layer's, where the layout allows (transposed float32,
    int8): the same numbers, stored once. Packed bfloat16 weights are opaque, so those keep their own copy."""
    for parent, fused_name, names in groups:
        fused, parts = getattr(parent, fused_name), [getattr(parent, n) for n in names]
        start = 0
        for part in parts:
            end = start + part.out_features
            if isinstance(fused, TransposedLinear) and isinstance(part, TransposedLinear):
                part.weight_t = fused.weight_t[:, start:end]
            elif isinstance(fused, Int8Linear) and isinstance(part, Int8Linear):
                part.weight_int8, part.scale = fused.weight_int8[start:end], fused.scale[start:end]
            start = end


def decoding_layout(model: nn.Module, precision: str) -> None:
    """Rewrite the linear layers of a model this package loaded, for decoding in ``precision`` (``float32``,
    ``bfloat16``, ``float16`` or ``int8``; the model already cast to its floating-point precision)."""
    groups = fuse_projections(model)
    make = {"float32": TransposedLinear.wrap, "int8": Int8Linear}.get(precision, PackedLinear.wrap)
    _replace_linears(model, make)
    share_fused(groups)


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
