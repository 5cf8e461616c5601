"""prune_linear / AdmmPruner end to end against admm_sparse.reference.prune_linear, and bad input."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import admm_sparse
from admm_sparse import layer as layer_module
from admm_sparse import reference as ref
from admm_sparse.layer import quadratic_trace


def make_layer(d_out, d_in, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias).to(dtype)


def calib(shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@given(d_out=st.integers(1, 48), d_in=st.integers(1, 48), tokens=st.integers(1, 64),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), bias=st.booleans(),
       three_d=st.booleans(), ratio=st.sampled_from([0.0, 0.3, 0.5, 0.95]), keep_bits=st.sampled_from([2, None]),
       seed=st.integers(0, 1000))
def test_prune_linear_matches_reference(d_out, d_in, tokens, dtype, bias, three_d, ratio, keep_bits, seed):
    layer = make_layer(d_out, d_in, dtype, bias, seed)
    x = calib((2, tokens, d_in) if three_d else (tokens, d_in), dtype, seed + 1)
    w0 = layer.weight.detach().clone()
    b0 = None if layer.bias is None else layer.bias.detach().clone()
    report = admm_sparse.prune_linear(layer, x, ratio, keep_bits=keep_bits)
    w = layer.weight.detach()
    expected = ref.prune_linear(w0, [x], ratio, keep_bits=keep_bits)
    assert w.dtype == dtype and w.shape == w0.shape
    k = int(d_out * d_in * ratio)
    assert int((w == 0).sum()) >= k
    # Same float32 operations as the reference; compare where it matters: scaled by each input
    # channel's energy (a weight on a near-silent channel has no effect on the output).
    d = (x.float().reshape(-1, d_in) ** 2).sum(0).sqrt()
    scale = (w0.float().abs() * d).max().item() + 1e-6
    diff = ((w.float() - expected.float()) * d).abs().max().item()
    rounding = 2.0**-7 if dtype == torch.bfloat16 or keep_bits else 2.0**-10
    assert diff <= 1e-4 * scale + rounding * (w0.float().abs() * d).max().item()
    if b0 is not None:
        assert torch.equal(layer.bias.detach(), b0), "the bias is never changed"
    assert report.shape == (d_out, d_in) and report.tokens == x.numel() // d_in
    assert report.sparsity == int((w == 0).sum()) / w.numel()
    assert report.seconds >= 0 and report.damping >= 0 and math.isfinite(report.relative_error)


@pytest.mark.parametrize("mode", ["seed", "fast"])  # fast mode's report traces run in its GEMM dtype (bfloat16)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exactly_k_zeros_and_report_error(dtype, mode):
    layer = make_layer(96, 160, dtype)
    x = calib((4, 100, 160), dtype)
    w0 = layer.weight.detach().float().clone()
    report = admm_sparse.prune_linear(layer, x, 0.3, mode=mode)
    w = layer.weight.detach().float()
    assert int((w == 0).sum()) == int(96 * 160 * 0.3)
    xf = x.float().reshape(-1, 160)
    direct = ((xf @ (w - w0).T).norm() / (xf @ w0.T).norm()).item()
    assert report.relative_error == pytest.approx(direct, rel=1e-3)
    assert 0 < report.relative_error < 0.5


@pytest.mark.parametrize("rows,n,block", [(7, 5, 512), (64, 700, 512), (33, 130, 64), (200, 96, 32)])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_quadratic_trace_from_the_lower_triangle(rows, n, block, dtype):
    """tr(A H Aᵀ) from H's lower triangle alone (the upper one garbage), in float32 or bfloat16 products."""
    g = torch.Generator().manual_seed(rows + n)
    x = torch.randn(3 * n, n, generator=g) * torch.rand(n, generator=g)  # uneven channel scales
    h = x.T @ x
    a = torch.randn(rows, n, generator=g)
    exact = torch.einsum("ij,jk,ik->", a.double(), h.double(), a.double()).item()
    garbage = h.tril() + torch.randn(n, n, generator=g).triu(1) * 1e3
    got = quadratic_trace(garbage, a, block=block, dtype=dtype)
    # bfloat16: a few 2^-9 per term; 7x5 has 35 terms, 200x96 thousands (the errors average out)
    assert got == pytest.approx(exact, rel=1e-5 if dtype is None else (1e-2 if rows * n < 1000 else 2e-3))


def test_iterable_of_batches_equals_pruner_api():
    x = calib((3, 50, 40))
    a, b = make_layer(30, 40), make_layer(30, 40)
    admm_sparse.prune_linear(a, [x[0], x[1:]], 0.5)
    pruner = admm_sparse.AdmmPruner(b)
    pruner.add_batch(x[0])       # 2-D: counts as one sequence
    pruner.add_batch(x[1:])      # 3-D: two sequences
    assert pruner.nsamples == 3 and pruner.tokens == 150
    pruner.fasterprune(0.5)
    pruner.free()
    assert torch.equal(a.weight, b.weight)


def test_ratio_zero_only_rounds():
    layer = make_layer(32, 48)
    w0 = layer.weight.detach().clone()
    report = admm_sparse.prune_linear(layer, calib((200, 48)), 0.0, keep_bits=None)
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=1e-4, atol=1e-5)
    assert report.sparsity == 0 and report.relative_error < 1e-4


def test_fewer_tokens_than_inputs_warns_and_stays_correct():
    layer = make_layer(20, 64)
    x = calib((10, 64))
    w0 = layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="only 10 calibration tokens"):
        report = admm_sparse.prune_linear(layer, x, 0.5)
    w = layer.weight.detach()
    assert torch.isfinite(w).all() and int((w == 0).sum()) >= 640
    assert report.relative_error < 1.0
    expected = ref.prune_linear(w0, [x], 0.5)
    assert torch.equal(w == 0, expected == 0)


def test_tiny_1x1_layer():
    layer = make_layer(1, 1)
    report = admm_sparse.prune_linear(layer, calib((5, 1)), 0.5)
    assert report.shape == (1, 1) and torch.isfinite(layer.weight).all()


BAD_RATIOS = [-0.1, 1.0, 1.5, float("nan")]


@pytest.mark.parametrize("ratio", BAD_RATIOS)
def test_bad_ratio_raises_before_any_work(ratio):
    layer = make_layer(4, 4)
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="sparse_ratio must be in"):
        admm_sparse.prune_linear(layer, calib((10, 4)), ratio)
    assert torch.equal(layer.weight, w0)
    with pytest.raises(TypeError, match="sparse_ratio"):
        admm_sparse.prune_linear(layer, calib((10, 4)), "0.3")


def assert_rejected(layer, x, exc, match, **kw):
    w0 = layer.weight.detach().clone()
    with pytest.raises(exc, match=match):
        admm_sparse.prune_linear(layer, x, 0.3, **kw)
    assert torch.equal(layer.weight.detach(), w0), "the layer must be untouched"


def test_nan_or_inf_in_inputs_or_weight_named():
    x = calib((10, 4))
    x[3, 1] = float("nan")
    assert_rejected(make_layer(4, 4), x, ValueError, "calibration input contains NaN or inf")
    layer = make_layer(4, 4)
    with torch.no_grad():
        layer.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="layer's weight contains NaN or inf"):
        admm_sparse.prune_linear(layer, calib((10, 4)), 0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_is_exact_when_the_sum_overflows(dtype):
    big = torch.finfo(dtype).max / 2
    assert layer_module.all_finite(torch.full((4, 3), big, dtype=dtype))  # the sum overflows, the entries are fine
    assert layer_module.all_finite(torch.empty(0, 3, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.full((4, 3), big, dtype=dtype)
        t[2, 1] = bad
        assert not layer_module.all_finite(t)
    pair = torch.tensor([float("inf"), -float("inf")], dtype=dtype)  # a NaN sum
    assert not layer_module.all_finite(pair)


def test_wrong_shapes_and_types():
    assert_rejected(make_layer(4, 4), calib((10, 5)), ValueError, "last dimension must be in_features=4")
    assert_rejected(make_layer(4, 4), torch.ones(10, 4, dtype=torch.int64), TypeError, "floating tensor")
    assert_rejected(make_layer(4, 4), torch.empty(0, 4), ValueError, "holds no tokens")
    with pytest.raises(TypeError, match="nn.Linear"):
        admm_sparse.prune_linear(nn.Conv1d(4, 4, 1), calib((10, 4)), 0.3)
    assert_rejected(make_layer(4, 4), calib((10, 4)), TypeError, "unknown option", percdamp_typo=1)
    assert_rejected(make_layer(4, 4), calib((10, 4)), ValueError, "prune_iters", prune_iters=30)
    assert_rejected(make_layer(4, 4), calib((10, 4)), ValueError, "keep_bits", keep_bits=11)


def test_fasterprune_before_add_batch_and_after_free():
    layer = make_layer(4, 4)
    pruner = admm_sparse.AdmmPruner(layer)
    with pytest.raises(RuntimeError, match="call add_batch"):
        pruner.fasterprune(0.3)
    pruner.free()
    with pytest.raises(RuntimeError, match="freed"):
        pruner.add_batch(calib((3, 4)))


def test_weight_beyond_float16_range_with_rounding():
    layer = make_layer(8, 8)
    with torch.no_grad():
        layer.weight[0, 0] = 1e6
    assert_rejected(layer, calib((50, 8)), ValueError, "float16")
    admm_sparse.prune_linear(layer, calib((50, 8)), 0.3, keep_bits=None)  # fine without rounding


def test_allow_tf32_is_checked_and_torch_setting_restored(monkeypatch):
    x = torch.randn(64, 16)
    with pytest.raises(ValueError, match="allow_tf32 must be True or False"):
        admm_sparse.prune_linear(nn.Linear(16, 8), x, 0.3, allow_tf32="yes")
    matmul = torch.backends.cuda.matmul
    seen = []
    original = layer_module.AdmmPruner._prune

    def spy(self, *args, **kwargs):
        seen.append(matmul.fp32_precision)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(layer_module.AdmmPruner, "_prune", spy)
    before = matmul.fp32_precision
    try:
        for caller_setting in ("tf32", "ieee"):
            matmul.fp32_precision = caller_setting
            for allow in (False, True):
                admm_sparse.prune_linear(nn.Linear(16, 8), x, 0.3, allow_tf32=allow)
                assert seen.pop() == ("tf32" if allow else "ieee")  # in force while pruning
                assert matmul.fp32_precision == caller_setting  # the caller's setting is back
    finally:
        matmul.fp32_precision = before


def test_statistics_are_float64_sums_rounded_once():
    """H and the scaler are the float64 sums of each batch's float32 products, rounded to float32 when first
    read; the scaler is SPEC §1's running mean over sequences (which telescopes to Σx² / sequences)."""
    batches = [calib((2, 30, 40)), calib((25, 40)), calib((3, 10, 40))]
    pruner = admm_sparse.AdmmPruner(make_layer(20, 40))
    for x in batches:
        pruner.add_batch(x)
    exact_h = sum((x.reshape(-1, 40).double().T @ x.reshape(-1, 40).double() for x in batches))
    torch.testing.assert_close(pruner.H.tril(), exact_h.float().tril(), rtol=1e-6, atol=1e-5)
    assert pruner.H.dtype == torch.float32 and torch.count_nonzero(pruner.H.triu(1)) == 0
    running, n = torch.zeros(40, dtype=torch.float64), 0
    for x in batches:  # SPEC §1's running mean, in float64
        b = x.shape[0] if x.dim() >= 3 else 1
        running = running * n / (n + b) + (x.reshape(-1, 40).double() ** 2).sum(0) / (n + b)
        n += b
    assert pruner.nsamples == n == 6
    torch.testing.assert_close(pruner.scaler, running.float(), rtol=1e-6, atol=0)


def test_statistics_are_final_once_read():
    pruner = admm_sparse.AdmmPruner(make_layer(20, 40))
    pruner.add_batch(calib((30, 40)))
    assert pruner.H is not None  # reading them rounds the sums and ends the accumulation
    with pytest.raises(RuntimeError, match="final once read"):
        pruner.add_batch(calib((30, 40)))
    assert pruner.hessian_sum is None and pruner.H is pruner.H
