"""Keep-bit rounding (SPEC §3): bit for bit against hand-worked values and the frexp reference."""
import pytest
import torch

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
