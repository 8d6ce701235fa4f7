"""Linear layers rewritten for CPU decoding: float32 weights stored transposed, bfloat16 weights for the native
kernels (:mod:`eco_guard.backends.native`, with a oneDNN-packed copy for batches) or packed once for oneDNN where
those cannot run, or int8 weights; and each layer's q/k/v and gate/up projections fused into one product.

Decoding one token reads every weight once, so its time is the weights' size over the memory bandwidth, and
how close a kernel comes to it depends on the layout: MKL's one-row float32 product reads an ``(in, out)``
weight 1.3-2x faster than ``nn.Linear``'s ``(out, in)`` (SmolLM2's output head: 11.3 -> 5.0 ms; for 4-16 rows
it is 10-30% slower, a price paid for the single stream), and one
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

from collections.abc import Callable, Mapping

import torch
from torch import nn

from eco_guard.backends.native import NativeLinear
from eco_guard.precision import native_bf16

__all__ = ["Int8Linear", "PackedLinear", "TransposedLinear", "decoding_layout", "pack_linears", "quantize_linears"]

# per decoder layer: (submodule, fused name, projections fused into it, in output order)
_FUSED = (("self_attn", "eco_qkv", ("q_proj", "k_proj", "v_proj")), ("mlp", "eco_gate_up", ("gate_proj", "up_proj")))


class TransposedLinear(nn.Module):
    """``nn.Linear`` over its float32 weight stored transposed, ``(in, out)``: the layout MKL's one-row product
    reads fastest (inference only). ``weight_t`` may be a column block of a larger matrix (a fused projection).

    Example:
        >>> layer = torch.nn.Linear(8, 4)
        >>> x = torch.randn(2, 8)
        >>> torch.allclose(TransposedLinear(layer.weight.detach().t().contiguous(), layer.bias)(x), layer(x))
        True
    """

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight_t.shape
        self.register_buffer("weight_t", weight_t, persistent=False)
        self.bias = bias

    def rows(self, start: int, end: int) -> TransposedLinear:
        """The layer of outputs ``start:end``, its weight a view of this one's."""
        bias = None if self.bias is None else self.bias[start:end]
        return TransposedLinear(self.weight_t[:, start:end], bias)

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


def _replace_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> int:
    """Put ``make(name, linear)`` in place of every ``nn.Linear`` of ``model`` (``make`` may return it unchanged)."""
    count = 0
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and (new := make(f"{prefix}.{name}" if prefix else name, child)) is not child:
                setattr(parent, name, new)
                count += 1
    return count


def _stacked(parts: list[nn.Linear]) -> nn.Linear:
    """One ``nn.Linear`` whose output is ``parts``' outputs side by side (a new weight; the parts untouched)."""
    fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None,
                      device="meta")
    fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    return fused


def _bounds(parts: list[nn.Linear]) -> list[tuple[int, int]]:
    """Where each part's outputs lie in the outputs of their fused layer."""
    ends = [sum(p.out_features for p in parts[: i + 1]) for i in range(len(parts))]
    return list(zip([0, *ends[:-1]], ends))


def _transposed(parts: list[nn.Linear], name: str, stored: Mapping[str, torch.Tensor] | None) -> TransposedLinear:
    """``parts`` (one or several float32 layers) as one transposed layer: from ``stored`` where it holds
    ``name``, else their weights written side by side into one ``(in, out)`` matrix (no stacked copy on the way)."""
    if stored is not None and f"{name}.weight_t" in stored:
        return TransposedLinear(stored[f"{name}.weight_t"], stored.get(f"{name}.bias"))
    columns = torch.empty((parts[0].in_features, sum(p.out_features for p in parts)))
    for p, (a, b) in zip(parts, _bounds(parts)):
        columns[:, a:b].copy_(p.weight.detach().t())
    bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
    return TransposedLinear(columns, bias)


def decoding_layout(model: nn.Module, precision: str,
                    stored: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Rewrite the linear layers of a model this package loaded, for decoding in ``precision`` (``float32``,
    ``bfloat16``, ``float16`` or ``int8``; the model already cast to its floating-point precision).

    Each Llama-family decoder layer also gets one fused layer per group (``self_attn.eco_qkv``,
    ``mlp.eco_gate_up``): the model's own forward ignores them; the decoding step
    (:class:`~eco_guard.backends.decode_step.LlamaDecodeStep`) multiplies once where it would three or two times.
    The projections become views of the fused weight where the format allows (transposed float32, int8, native
    bfloat16, a precision left as it is) and keep copies of their own where it is opaque (packed bfloat16 without
    the native kernels). In bfloat16 the whole and fused layers the decoding step multiplies through are
    :class:`~eco_guard.backends.native.NativeLinear` where the kernels run: one row natively, several on a packed
    copy.

    In float32 the transposed weights are returned by layer name; given back as ``stored`` (a file the caller
    saved them in, mapped lazily), they are used as they are and the model's own linear weights are never read.
    """
    made: dict[str, torch.Tensor] = {}

    def convert(name: str, parts: list[nn.Linear]) -> nn.Module:
        if precision == "float32":
            layer = _transposed(parts, name, stored)
            made[f"{name}.weight_t"] = layer.weight_t
            if layer.bias is not None:
                made[f"{name}.bias"] = layer.bias
            return layer
        linear = parts[0] if len(parts) == 1 else _stacked(parts)
        if precision == "int8":
            return Int8Linear(linear)
        packed = PackedLinear.wrap(linear)
        native = NativeLinear.wrap(linear, batched=None if packed is linear else packed)
        return packed if native is linear else native

    for index, layer in enumerate(getattr(getattr(model, "model", None), "layers", None) or []):
        for sub, fused_name, names in _FUSED:
            parent = getattr(layer, sub, None)
            parts = [getattr(parent, n, None) for n in names]
            if not all(type(p) is nn.Linear for p in parts):
                continue
            fused = convert(f"model.layers.{index}.{sub}.{fused_name}", parts)
            setattr(parent, fused_name, fused)
            for name, part, (a, b) in zip(names, parts, _bounds(parts)):
                if isinstance(fused, (TransposedLinear, Int8Linear, NativeLinear)):
                    setattr(parent, name, fused.rows(a, b))
                elif isinstance(fused, nn.Linear):  # a precision left as it is
                    part.weight = nn.Parameter(fused.weight[a:b], requires_grad=False)
                else:  # packed: opaque, so a copy of its own
                    setattr(parent, name, convert(f"model.layers.{index}.{sub}.{name}", [part]))
    _replace_linears(model, lambda name, linear: convert(name, [linear]))
    return made


def pack_linears(model: nn.Module) -> int:
    """Replace every bfloat16 ``nn.Linear`` of ``model`` by a :class:`PackedLinear`; returns how many."""
    return _replace_linears(model, lambda _, linear: PackedLinear.wrap(linear))


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

    def rows(self, start: int, end: int) -> Int8Linear:
        """The layer of outputs ``start:end``, its weights and scales views of this one's."""
        part = Int8Linear.__new__(Int8Linear)
        nn.Module.__init__(part)
        part.in_features, part.out_features = self.in_features, end - start
        part.register_buffer("weight_int8", self.weight_int8[start:end], persistent=False)
        part.register_buffer("scale", self.scale[start:end], persistent=False)
        part.bias = None if self.bias is None else self.bias[start:end]
        return part

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
    return _replace_linears(model, lambda _, linear: Int8Linear(linear))
