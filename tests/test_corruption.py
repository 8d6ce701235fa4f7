"""Tests for eco_guard.corruption: the 14 corruptors, their contract, the registry, specs and seeds."""

from __future__ import annotations

import doctest

import pytest
import torch
from pydantic import ValidationError

from eco_guard import corruption
from eco_guard.corruption import (
    CORRUPTORS,
    MAX_SEED,
    CorruptionList,
    CorruptionSpec,
    Corruptor,
    derive_seed,
    get_corruptor,
    register_corruptor,
    request_generators,
)
from eco_guard.errors import ConfigError, InputError

SEED_METHODS = {
    "rand_noise_first_n", "rand_noise_rand_n", "rand_noise_top_k", "zero_out_top_k", "zero_out_first_n",
    "flip_sign_first_n", "flip_sign_top_k", "sub_value_top_k", "add_value_least_k", "sub_value_first_n",
    "add_value_first_n", "set_rand_noise_first_n", "reverse_order", "shuffle",
}  # fmt: skip
ALL = sorted(CORRUPTORS)
STOCHASTIC = sorted(name for name, cls in CORRUPTORS.items() if cls.stochastic)
BATCH, SEQ, DIM = 3, 6, 8


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def embeds() -> torch.Tensor:
    return torch.randn(BATCH, SEQ, DIM, generator=_gen(123))


@pytest.fixture
def mask() -> torch.Tensor:
    m = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    m[0, 1:4] = True
    m[1, [0, 5]] = True  # row 2 stays unmasked
    return m


def _make(name: str, dims: int = 2, strength: float = 3.0) -> Corruptor:
    return get_corruptor(name)(dims=dims, strength=strength)


def test_registry_holds_the_seed_methods():
    assert set(CORRUPTORS) == SEED_METHODS
    assert corruption.DEFAULT_METHOD == "rand_noise_first_n"
    with pytest.raises(TypeError):
        CORRUPTORS["x"] = Corruptor  # type: ignore[index]


@pytest.mark.parametrize("name", ALL)
def test_contract_pure_and_masked_only(name, embeds, mask):
    before = embeds.clone()
    out = _make(name)(embeds, mask, generator=_gen())
    assert torch.equal(embeds, before), "input was modified"
    assert out is not embeds and out.data_ptr() != embeds.data_ptr()
    assert out.shape == embeds.shape and out.dtype == embeds.dtype and out.device == embeds.device
    assert torch.equal(out[~mask], embeds[~mask]), "an unmasked token changed"
    assert not torch.equal(out[mask], embeds[mask]), "no masked token changed"


@pytest.mark.parametrize("name", ALL)
def test_empty_mask_returns_an_equal_copy(name, embeds):
    out = _make(name)(embeds, torch.zeros(BATCH, SEQ, dtype=torch.bool))
    assert torch.equal(out, embeds) and out is not embeds


@pytest.mark.parametrize("name", ALL)
def test_low_precision_dtypes(name, embeds, mask):
    half = embeds.to(torch.bfloat16)
    out = _make(name)(half, mask, generator=_gen())
    assert out.dtype == torch.bfloat16 and torch.equal(out[~mask], half[~mask])


@pytest.mark.parametrize("name", STOCHASTIC)
def test_same_generator_seed_same_output_other_seed_differs(name, embeds, mask):
    c = _make(name)
    assert torch.equal(c(embeds, mask, generator=_gen(1)), c(embeds, mask, generator=_gen(1)))
    assert not torch.equal(c(embeds, mask, generator=_gen(1)), c(embeds, mask, generator=_gen(2)))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_per_row_generators_make_rows_independent_of_batch_and_padding(name, embeds, mask):
    c = _make(name)
    full = c(embeds, mask, generator=[_gen(10), _gen(11), _gen(12)])
    alone = c(embeds[1:2], mask[1:2], generator=[_gen(11)])
    assert torch.equal(full[1], alone[0])
    # left-pad row 0 by two positions: the same tokens get the same corruption
    padded = torch.cat([torch.zeros(1, 2, DIM), embeds[:1]], dim=1)
    pmask = torch.cat([torch.zeros(1, 2, dtype=torch.bool), mask[:1]], dim=1)
    assert torch.equal(c(padded, pmask, generator=[_gen(10)])[0, 2:], full[0])


@pytest.mark.parametrize("name", sorted(set(ALL) - set(STOCHASTIC)))
def test_deterministic_methods_ignore_the_generator(name, embeds, mask):
    c = _make(name)
    assert torch.equal(c(embeds, mask), c(embeds, mask, generator=_gen(5)))


def test_rand_noise_first_n_only_first_dims_with_strength_as_std():
    embeds, mask = torch.zeros(1, 4000, 16), torch.ones(1, 4000, dtype=torch.bool)
    out = corruption.RandNoiseFirstN(dims=2, strength=3.0)(embeds, mask, generator=_gen())
    assert torch.count_nonzero(out[..., 2:]) == 0
    assert abs(out[..., :2].std().item() - 3.0) < 0.1 and abs(out[..., :2].mean().item()) < 0.1


def test_zero_strength_noise_is_identity(embeds, mask):
    for name in ("rand_noise_first_n", "rand_noise_rand_n", "rand_noise_top_k"):
        assert torch.equal(_make(name, strength=0.0)(embeds, mask, generator=_gen()), embeds)


def test_rand_noise_rand_n_one_column_set_per_row(embeds, mask):
    out = _make("rand_noise_rand_n", dims=3)(embeds, mask, generator=_gen())
    for row in (0, 1):
        changed = (out[row] != embeds[row])[mask[row]]
        assert (changed.sum(dim=1) == 3).all()
        assert (changed == changed[0]).all(), "tokens of one row got different columns"


def test_first_n_value_methods(embeds, mask):
    sel = embeds[mask]
    assert torch.equal(_make("zero_out_first_n")(embeds, mask)[mask][:, :2], torch.zeros(len(sel), 2))
    assert torch.equal(_make("flip_sign_first_n")(embeds, mask)[mask][:, :2], -sel[:, :2])
    assert torch.allclose(_make("add_value_first_n")(embeds, mask)[mask][:, :2], sel[:, :2] + 3)
    assert torch.allclose(_make("sub_value_first_n")(embeds, mask)[mask][:, :2], sel[:, :2] - 3)
    for name in ("zero_out_first_n", "flip_sign_first_n", "add_value_first_n", "sub_value_first_n"):
        assert torch.equal(_make(name)(embeds, mask)[mask][:, 2:], sel[:, 2:])


def test_set_rand_noise_first_n_replaces_values(embeds, mask):
    c = _make("set_rand_noise_first_n")
    a = c(embeds, mask, generator=_gen())[mask]
    b = c(embeds * 100, mask, generator=_gen())[mask]
    assert torch.equal(a[:, :2], b[:, :2]), "the result should not depend on the original values"
    assert torch.equal(a[:, 2:], embeds[mask][:, 2:])


def test_top_k_methods_pick_the_right_dimensions():
    x = torch.tensor([[[0.5, -4.0, 1.0, 3.0, -0.125]]])
    m = torch.ones(1, 1, dtype=torch.bool)
    assert _make("zero_out_top_k")(x, m).tolist() == [[[0.5, 0.0, 1.0, 0.0, -0.125]]]
    assert _make("flip_sign_top_k")(x, m).tolist() == [[[0.5, 4.0, 1.0, -3.0, -0.125]]]
    assert _make("sub_value_top_k", strength=1.0)(x, m).tolist() == [[[0.5, -4.0, 0.0, 2.0, -0.125]]]
    assert _make("add_value_least_k", strength=1.0)(x, m).tolist() == [[[0.5, -3.0, 1.0, 3.0, 0.875]]]
    noisy = _make("rand_noise_top_k")(x, m, generator=_gen())
    assert ((noisy != x)[0, 0] == torch.tensor([False, True, False, True, False])).all()


def test_reverse_order_within_masked_positions(embeds, mask):
    out = _make("reverse_order")(embeds, mask)
    assert torch.equal(out[0, 1:4], embeds[0, [3, 2, 1]])
    assert torch.equal(out[1, 0], embeds[1, 5]) and torch.equal(out[1, 5], embeds[1, 0])
    everything = torch.ones(BATCH, SEQ, dtype=torch.bool)
    assert torch.equal(_make("reverse_order")(embeds, everything), embeds.flip(1))


def test_shuffle_permutes_masked_positions(embeds):
    everything = torch.ones(BATCH, SEQ, dtype=torch.bool)
    out = _make("shuffle")(embeds, everything, generator=_gen())
    for row in range(BATCH):
        assert sorted(map(tuple, out[row].tolist())) == sorted(map(tuple, embeds[row].tolist()))
    assert not torch.equal(out, embeds)


def test_global_rng_used_without_generator(embeds, mask):
    torch.manual_seed(0)
    a = _make("rand_noise_first_n")(embeds, mask)
    torch.manual_seed(0)
    assert torch.equal(a, _make("rand_noise_first_n")(embeds, mask))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"dims": 0}, "dims=0"), ({"dims": True}, "dims=True"), ({"strength": -1.0}, "strength=-1.0"),
     ({"strength": float("nan")}, "strength=nan"), ({"strength": "5"}, "strength='5'")],
)  # fmt: skip
def test_bad_parameters_are_named(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        corruption.RandNoiseFirstN(**kwargs)


def test_dims_wider_than_embeddings(embeds, mask):
    with pytest.raises(ConfigError, match=f"dims=9 exceeds the embedding width {DIM}"):
        _make("zero_out_top_k", dims=9)(embeds, mask)
    _make("shuffle", dims=9)(embeds, mask)  # order corruptions do not use dims


@pytest.mark.parametrize(
    ("bad_embeds", "bad_mask", "fragment"),
    [
        (torch.zeros(BATCH, SEQ), None, "floating \\(batch, seq, dim\\)"),
        (torch.zeros(BATCH, SEQ, DIM, dtype=torch.long), None, "floating"),
        (None, torch.ones(BATCH, SEQ, dtype=torch.long), "mask.bool\\(\\)"),
        (None, torch.ones(BATCH, SEQ + 1, dtype=torch.bool), "mask shape"),
        (None, [[True] * SEQ] * BATCH, "boolean tensor"),
    ],
)
def test_bad_inputs(embeds, mask, bad_embeds, bad_mask, fragment):
    with pytest.raises(InputError, match=fragment):
        corruptor = _make("rand_noise_first_n")
        corruptor(embeds if bad_embeds is None else bad_embeds, mask if bad_mask is None else bad_mask)


def test_generator_count_must_match_rows(embeds, mask):
    with pytest.raises(InputError, match="2 generators for 3 rows"):
        _make("rand_noise_first_n")(embeds, mask, generator=[_gen(), _gen()])


def test_get_corruptor_lists_known_names():
    known = "method='nope' is not a known corruption; use one of: add_value_first_n, add_value_least_k, "
    with pytest.raises(ConfigError, match=known):
        get_corruptor("nope")


def test_register_refuses_duplicate_names():
    class Dup(corruption.ZeroOutFirstN):
        name = "zero_out_first_n"

    with pytest.raises(ConfigError, match="already registered"):
        register_corruptor(Dup)
    assert CORRUPTORS["zero_out_first_n"] is corruption.ZeroOutFirstN


def test_corruption_list_applies_in_order(embeds, mask):
    a, b = _make("flip_sign_first_n"), _make("rand_noise_first_n")
    gens = request_generators(0, ["x", "y", "z"])
    expected = b(a(embeds, mask), mask, generator=request_generators(0, ["x", "y", "z"]))
    assert torch.equal(CorruptionList([a, b])(embeds, mask, generator=gens), expected)
    empty = CorruptionList()(embeds, mask)
    assert torch.equal(empty, embeds) and empty is not embeds


def test_spec_defaults_round_trip_and_frozen():
    spec = CorruptionSpec()
    assert (spec.method, spec.dims, spec.strength, spec.seed) == ("rand_noise_first_n", 1, 5.0, 0)
    other = CorruptionSpec(method="sub_value_top_k", dims=3, strength=2.5, seed=42)
    assert CorruptionSpec.model_validate_json(other.model_dump_json()) == other
    assert CorruptionSpec(**other.model_dump()) == other
    with pytest.raises(ValidationError):
        other.strength = 1.0  # type: ignore[misc]
    assert other.build() == corruption.SubValueTopK(dims=3, strength=2.5)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [({"method": "gauss"}, "not a known corruption"), ({"dims": 0}, "dims"), ({"strength": -0.5}, "strength"),
     ({"strength": float("inf")}, "strength"), ({"seed": -1}, "seed"), ({"seed": MAX_SEED + 1}, "seed"),
     ({"sigma": 1.0}, "sigma")],
)  # fmt: skip
def test_spec_validation_names_the_field(data, fragment):
    with pytest.raises(ValidationError, match=fragment):
        CorruptionSpec(**data)


def test_spec_with_strength_validates():
    spec = CorruptionSpec(strength=1.0, seed=3)
    assert spec.with_strength(2.0) == CorruptionSpec(strength=2.0, seed=3)
    with pytest.raises(ValidationError):
        spec.with_strength(-1.0)
    assert spec.uses_strength and not CorruptionSpec(method="shuffle").uses_strength


def test_spec_apply_keys_seed_each_prompt(embeds, mask):
    spec = CorruptionSpec(dims=2, strength=3.0, seed=9)
    keys = ["who is harry potter?", [5, 6, 7], b"raw"]
    out = spec.apply(embeds, mask, keys=keys)
    assert torch.equal(out, spec.apply(embeds, mask, keys=keys))
    # a prompt's corruption does not depend on its batch mates
    assert torch.equal(spec.apply(embeds[1:2], mask[1:2], keys=[torch.tensor([5, 6, 7])])[0], out[1])
    assert not torch.equal(spec.apply(embeds, mask, keys=["other", [5, 6, 7], b"raw"])[0], out[0])
    assert not torch.equal(CorruptionSpec(dims=2, strength=3.0, seed=10).apply(embeds, mask, keys=keys), out)
    # without keys one generator seeded with the topic seed serves the rows
    assert torch.equal(spec.apply(embeds, mask), spec.apply(embeds, mask))
    with pytest.raises(InputError, match="generators for 3 rows"):
        spec.apply(embeds, mask, keys=["a"])


def test_derive_seed_is_stable_and_spread():
    assert derive_seed(0, "Who is Harry Potter?") == 4136354801211982129  # frozen: stored results depend on it
    seeds = {derive_seed(s, k) for s in (0, 1, MAX_SEED) for k in ("a", "b", b"a", [97], [])}
    assert len(seeds) == 15 and all(0 <= s <= MAX_SEED for s in seeds)
    assert derive_seed(4, [1, 2]) == derive_seed(4, torch.tensor([1, 2]))


@pytest.mark.parametrize("bad", [-1, MAX_SEED + 1, 1.5, True])
def test_derive_seed_rejects_bad_seeds(bad):
    with pytest.raises(ConfigError, match="seed="):
        derive_seed(bad, "x")


@pytest.mark.parametrize("bad", [1.5, [1.0, 2.0], [True], torch.tensor(3), None])
def test_derive_seed_rejects_bad_keys(bad):
    with pytest.raises(InputError, match="seed key"):
        derive_seed(0, bad)


def test_cpu_generator_gives_the_same_noise_on_any_device(embeds, mask):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    spec = CorruptionSpec(method="rand_noise_rand_n", dims=2, strength=3.0)
    keys = ["a", "b", "c"]
    on_gpu = spec.apply(embeds.cuda(), mask.cuda(), keys=keys)
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), spec.apply(embeds, mask, keys=keys))


def test_docstring_examples_run():
    result = doctest.testmod(corruption, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
