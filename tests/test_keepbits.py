"""Keep-bit rounding (SPEC §3) and rounding by salience: bit for bit against hand-worked values and the frexp
references."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from admm_sparse import keepbits
from admm_sparse import reference as ref


def f16(values):
    return torch.tensor(values, dtype=torch.float16)


def bits(t):
    return t.view(torch.int16).tolist()


ALL_FLOAT16 = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
ALL_FLOAT16 = ALL_FLOAT16[~torch.isnan(ALL_FLOAT16)]


# (input, rounded with keep_bits=2, reason). m = mantissa in [1, 2), e = exponent.
HAND_CASES = [
    (0.0, 0.0, "zero stays zero"),
    (-0.0, 0.0, "a zero result is +0 for the compression unit"),
    (2.0**-20, 0.0, "subnormal (e < -14) rounds to zero"),
    (-(2.0**-24), 0.0, "smallest subnormal, negative: +0"),
    (1.25 * 2.0**-10, 2.0**-10, "band -15 < e < -8: m=1.25 -> 1"),
    (1.5 * 2.0**-12, 2.0**-12, "band: m=1.5 is not > 1.5 -> 1"),
    (1.75 * 2.0**-9, 2.0**-8, "band: m=1.75 > 1.5 -> 2"),
    (1.5 * 2.0**-14, 2.0**-14, "band starts at the smallest normal e=-14"),
    (1.125, 1.0, "m*4 = 4.5: half to even -> 4"),
    (1.375, 1.5, "m*4 = 5.5: half to even -> 6"),
    (1.0625, 1.0, "m*4 = 4.25 -> 4"),
    (1.9, 2.0, "m*4 = 7.6 -> 8: carry into the exponent"),
    (-3.3, -3.5, "negative: sign kept, m=1.65 -> 1.75"),
    (1.125 * 2.0**-8, 1.0 * 2.0**-8, "e = -8 is outside the band: ordinary rounding"),
    (65504.0, float("inf"), "largest float16: m -> 2 overflows like the SPEC's float16 result"),
]


@pytest.mark.parametrize("value,expected,why", HAND_CASES)
def test_round_hand_cases(value, expected, why):
    out = keepbits.round_float16(f16([value]))
    assert bits(out) == bits(f16([expected])), why


@pytest.mark.parametrize("value,expected", [
    (1.1, 1.1),                          # kept: mantissa unrounded
    (2.0**-20, 2.0**-20),                # kept subnormal is left as is
    (1.25 * 2.0**-10, 2.0**-10),         # the band rule still applies where kept
    (1.75 * 2.0**-9, 2.0**-8),
    (0.0, 0.0),
])
def test_round_keep_hand_cases(value, expected):
    x = f16([value])
    out = keepbits.round_float16(x, torch.ones(1, dtype=torch.bool))
    assert bits(out) == bits(f16([expected]))


@pytest.mark.parametrize("keep_bits", range(11))
@pytest.mark.parametrize("keep", ["none", "all", "random"])
def test_round_every_float16_matches_frexp_reference(keep_bits, keep):
    mask = {"none": None, "all": torch.ones_like(ALL_FLOAT16, dtype=torch.bool),
            "random": torch.rand(ALL_FLOAT16.shape, generator=torch.Generator().manual_seed(keep_bits)) < 0.5}[keep]
    out = keepbits.round_float16(ALL_FLOAT16, mask, keep_bits)
    expected = ref.keepbit_round(ALL_FLOAT16, mask, keep_bits)
    assert torch.equal(out, expected)  # == also treats -0 and +0 as equal
    assert not (out.view(torch.int16) == -32768).any(), "no -0.0 in the output"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 96), (7, 3), (1, 1), (300, 200)])
def test_keep_mask_matches_sorting_reference(dtype, shape):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    w[w.abs() < 0.01] = 0  # pruned entries
    scaler = torch.rand(shape[1], generator=g) + 0.1
    keep = keepbits.keep_mask(w, scaler)
    assert torch.equal(keep, ref.keep_mask(w, scaler))
    if w.numel() >= 1000:
        assert abs(int(keep.sum()) - 0.02 * w.numel()) <= 2


def test_keep_mask_seed_index_rule_for_tiny_layers():
    w = f16([[0.3, 0.7, 1.1]])
    # 3 * 0.02 - 1 = -0.94 -> int() -> 0: the single largest error is kept.
    keep = keepbits.keep_mask(w, torch.ones(3))
    assert int(keep.sum()) == 1
    assert not keepbits.keep_mask(w, torch.ones(3), keep_proportion=0.0).any()


def test_apply_keepbits_keeps_zeros_and_dtype():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(50, 80, generator=g).to(torch.bfloat16)
    w[:, ::3] = 0
    out = keepbits.apply_keepbits(w, torch.ones(80))
    assert out.dtype == torch.bfloat16
    assert (out[:, ::3] == 0).all()
    assert int((out == 0).sum()) >= int((w == 0).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("keep_proportion", [0.0, 0.02, 0.5, 1.0])
def test_apply_keepbits_matches_reference_bit_for_bit(dtype, keep_proportion):
    # apply_keepbits rounds the kept entries separately; the reference rounds everything in one call.
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(70, 90, generator=g) * torch.logspace(-6, 1, 90)).to(dtype)  # subnormals and band values
    w[:, ::4] = 0
    scaler = torch.rand(90, generator=g) + 0.1
    out = keepbits.apply_keepbits(w, scaler, 2, keep_proportion)
    keep = ref.keep_mask(w, scaler, 2, keep_proportion) if keep_proportion > 0 else None
    expected = ref.keepbit_round(w, keep, 2).to(dtype)
    assert out.dtype == dtype
    assert torch.equal(out, expected)  # == also treats the reference's -0.0 as our +0.0
    assert not torch.signbit(out[out == 0]).any()


def test_round_in_slices_equals_one_pass(monkeypatch):
    keep = torch.rand(ALL_FLOAT16.shape, generator=torch.Generator().manual_seed(5)) < 0.3
    whole = keepbits.round_float16(ALL_FLOAT16, keep)
    monkeypatch.setattr(keepbits, "_SLICE", 1000)  # many slices, a ragged last one
    grid = ALL_FLOAT16[:63489].view(-1, 3)[:, :2]  # a non-contiguous 2-D view
    sliced = keepbits.round_float16(grid, keep[:63489].view(-1, 3)[:, :2])
    assert torch.equal(sliced, whole[:63489].view(-1, 3)[:, :2])


# ---------------------------------------------------------------- rounding by salience

FINITE_FLOAT16 = ALL_FLOAT16[torch.isfinite(ALL_FLOAT16)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("level", [0.0, 1.0, 1.25, 2.5, 4.0, 10.0])
@pytest.mark.parametrize("scaler", ["ones", "random"])
def test_round_by_salience_every_finite_float16_matches_frexp_reference(level, scaler):
    w = FINITE_FLOAT16[: 240 * 256].view(240, 256)
    s = torch.ones(256) if scaler == "ones" else torch.rand(256, generator=torch.Generator().manual_seed(7)) ** 4
    out = keepbits.round_by_salience(w, s, level)
    assert same_bits(out, ref.salience_round(w, s, level))
    assert not (out.view(torch.int16) == -32768).any(), "no -0.0 in the output"
    assert torch.equal(out == 0, w == 0), "zeros stay zeros, and no weight is rounded to zero"


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), level=st.floats(0, 10), zeros=st.floats(0, 1),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16),
       dead_channels=st.booleans())
def test_round_by_salience_matches_reference(rows, cols, level, zeros, dtype, seed, dead_channels):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * torch.logspace(-7, 1, cols)[torch.randperm(cols, generator=g)])
    w[torch.rand(rows, cols, generator=g) < zeros] = 0
    w = w.to(dtype)
    s = torch.rand(cols, generator=g) ** 3
    if dead_channels:
        s[::2] = 0  # channels no calibration token reaches
    out = keepbits.apply_keepbits(w, s, 2, 0.02, level)
    assert out.dtype == dtype
    assert same_bits(out.to(torch.float16), ref.salience_round(w, s, level))
    assert torch.equal(out == 0, w.to(torch.float16) == 0)


def test_salience_bits_follow_salience():
    # Four times the salience is one more mantissa bit; a weight of mean salience keeps round(level) bits.
    w = torch.tensor([[1.0, 2.0, 4.0, 8.0, 0.0]])
    s = torch.ones(5)
    mean = (1 + 4 + 16 + 64) / 4
    bits = keepbits.salience_mantissa_bits(w, s, 3.0, keepbits.salience_mean(w, s))
    assert keepbits.salience_mean(w, s) == mean
    expected = [max(1, min(10, round(3 + 0.5 * math.log2(x * x / mean)))) for x in (1.0, 2.0, 4.0, 8.0)]
    assert bits[0, :4].tolist() == expected == [1, 2, 3, 4]
    on_mean = torch.full((2, 3), 0.5)
    assert (keepbits.salience_mantissa_bits(on_mean, torch.ones(3), 2.4, 0.25) == 2).all()
    assert keepbits.salience_mean(torch.zeros(2, 3), torch.ones(3)) == 0
    assert (keepbits.salience_mantissa_bits(torch.zeros(2, 3), torch.ones(3), 2.4, 0.0) == 2).all()  # nothing to rank


def test_round_by_salience_spends_bits_where_the_error_is():
    # At the same mean mantissa bits, the salience allocation moves the outputs less than one bit count for all
    # (the claim of keepbits' docstring, on a layer with uneven channels).
    g = torch.Generator().manual_seed(11)
    w = torch.randn(256, 128, generator=g) * 0.05
    s = torch.rand(128, generator=g) ** 6 * 100
    mean = keepbits.salience_mean(w, s)
    # the smallest level whose weights keep 2 mantissa bits on average, as keep_bits=2 does
    level = next(x / 20 for x in range(20, 200) if keepbits.salience_mantissa_bits(w, s, x / 20, mean).float().mean() >= 2)
    assert keepbits.salience_mantissa_bits(w, s, level, mean).float().mean() < 2.1
    uniform = keepbits.round_float16(w, None, 2)
    salience = keepbits.round_by_salience(w, s, level)

    def error(r):
        return float(((r.float() - w).square() * s[None, :]).sum())
    assert error(salience) < 0.7 * error(uniform)


def test_salience_bits_option_rounds_the_pruned_weight():
    from admm_sparse.layer import AdmmPruner

    g = torch.Generator().manual_seed(4)
    X = torch.randn(4, 64, 48, generator=g) * torch.linspace(0.1, 3, 48)
    reports, weights = {}, {}
    for key, options in (("off", dict(keep_bits=None)), ("salience", dict(salience_bits=1.5))):
        torch.manual_seed(0)
        layer = torch.nn.Linear(48, 40)
        pruner = AdmmPruner(layer)
        pruner.add_batch(X)
        reports[key], weights[key] = pruner.fasterprune(0.4, **options), layer.weight.detach().clone()
        scaler = pruner.scaler
    # the seed's ADMM, then the rounding by salience with the layer's scaler
    assert same_bits(weights["salience"].half(), keepbits.round_by_salience(weights["off"], scaler, 1.5))
    r = reports["salience"]
    assert (r.keep_bits, r.keep_proportion, r.salience_bits) == (2, None, 1.5)
    assert reports["off"].salience_bits is None


@pytest.mark.parametrize("options, message", [
    (dict(salience_bits=-1), "salience_bits must be a number in \\[0, 10\\]"),
    (dict(salience_bits="2"), "salience_bits must be a number"),
    (dict(salience_bits=True), "salience_bits must be a number"),
    (dict(salience_bits=1.0, keep_bits=None), "keep_bits=None turns off"),
])
def test_salience_bits_bad_options(options, message):
    from admm_sparse.layer import check_options

    with pytest.raises(ValueError, match=message):
        check_options(options)


def test_salience_bits_config_yaml_and_refusal_under_a_budget():
    from admm_sparse.config import ConfigError, FloatSparseConfig, parse_config
    from admm_sparse.layer import check_options

    cfg = parse_config({"spec": {"process": [{"type": "float_sparse", "salience_bits": 1.25}]}})
    assert cfg.pruner_options()["salience_bits"] == 1.25
    assert check_options(dict(mode="quality", salience_bits=1.0))["round_in_admm"] is True  # as with keep_bits
    with pytest.raises(ConfigError, match="salience_bits must not be set"):
        FloatSparseConfig(salience_bits=1.0, target_bits_per_weight=4.0)
    with pytest.raises(ConfigError, match="salience_bits"):
        FloatSparseConfig(salience_bits=11)



@pytest.mark.parametrize("mode", ["seed", "quality"])
def test_salience_rounding_with_feedback_beats_rounding_after(mode):
    # round_in_admm: the rounding errors pushed onto the inputs not yet rounded (quality.round_with_feedback)
    from admm_sparse.layer import AdmmPruner

    g = torch.Generator().manual_seed(9)
    mix = torch.randn(64, 64, generator=g) / 8 + torch.eye(64)  # correlated inputs, uneven channels
    X = (torch.randn(8, 128, 64, generator=g) @ mix) * torch.linspace(0.2, 4, 64)
    results = {}
    for round_in_admm in (False, True):
        torch.manual_seed(1)
        layer = torch.nn.Linear(64, 48)
        pruner = AdmmPruner(layer)
        pruner.add_batch(X)
        report = pruner.fasterprune(0.5, mode=mode, salience_bits=1.0, round_in_admm=round_in_admm)
        results[round_in_admm] = report, layer.weight.detach().clone()
    (after, w_after), (inside, w_inside) = results[False], results[True]
    assert torch.equal(w_after == 0, w_inside == 0)  # the same support
    assert torch.equal(w_inside, w_inside.half().float())  # float16 values as delivered
    assert inside.relative_error < after.relative_error
    assert inside.salience_bits == 1.0 and inside.keep_proportion is None
