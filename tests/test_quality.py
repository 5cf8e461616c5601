"""Quality mode (admm_sparse.quality): exact refit, never worse than the seed, rounding inside ADMM
exactly representable, bad options rejected with the layer untouched."""
import math

import pytest
import torch
from torch import nn

import admm_sparse
from admm_sparse import keepbits, quality


def make_layer(d_out, d_in, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out).to(dtype)


def inputs(kind, tokens, d_in, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g)
    if kind == "correlated":
        x = x @ (torch.randn(d_in, d_in, generator=g) * 2 / math.sqrt(d_in) + torch.eye(d_in))
        x = x * torch.exp(torch.randn(d_in, generator=g) * 0.7)
    return x


def test_pcg_refit_equals_dense_least_squares():
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 24, 10
    x = torch.randn(60, d_in, generator=g) @ (torch.eye(d_in) + 0.3 * torch.randn(d_in, d_in, generator=g))
    w0 = torch.randn(d_out, d_in, generator=g)
    h = x.T @ x
    ctx = quality.make_context(h.tril(), w0, 0.01)
    support = torch.rand(d_in, d_out, generator=g) < 0.5
    got = quality.pcg_on_support(ctx["hd"], ctx["b"], support, torch.zeros(d_in, d_out), 500, tol=1e-7)
    hd, wn0 = ctx["hd"].double(), ctx["wn0"].double()
    for j in range(d_out):
        s = support[:, j]
        expected = torch.zeros(d_in, dtype=torch.float64)
        # min (w - w0)^T Hd (w - w0) with w zero off S: Hd_SS w_S = (Hd w0)_S, solved densely in float64.
        expected[s] = torch.linalg.solve(hd[s][:, s], (hd @ wn0[:, j])[s])
        torch.testing.assert_close(got[:, j].double(), expected, rtol=1e-4, atol=1e-4)
        assert (got[~s, j] == 0).all()


def test_quality_refit_is_optimal_on_its_support():
    layer = make_layer(16, 32)
    x = inputs("correlated", 200, 32, 1)
    w0 = layer.weight.detach().clone()
    report = admm_sparse.prune_linear(layer, x, 0.5, mode="quality", keep_bits=None, percdamp=0.0)
    w = layer.weight.detach().double()
    h = (x.T @ x).double()
    for j in range(16):  # each output row: the least-squares optimum of ||X (w - w0)|| on its support
        s = w[j] != 0
        expected = torch.linalg.lstsq(x.double()[:, s], (x.double() @ w0[j].double()).unsqueeze(1)).solution[:, 0]
        torch.testing.assert_close(w[j, s], expected, rtol=1e-3, atol=1e-4)
    assert report.error_after_refit <= report.error_before_refit + 1e-9
    direct = math.sqrt(((w - w0.double()) @ h * (w - w0.double())).sum() / ((w0.double() @ h) * w0.double()).sum())
    assert report.relative_error == pytest.approx(direct, rel=1e-3)


CASES = [(kind, ratio, structure, seed) for kind in ("random", "correlated") for seed in (0, 1)
         for ratio, structure in ((0.5, "unstructured"), (0.7, "unstructured"), (0.5, "per_row"), (None, "2:4"))]


@pytest.mark.parametrize("kind,ratio,structure,seed", CASES)
def test_quality_never_worse_than_seed(kind, ratio, structure, seed):
    x = inputs(kind, 400, 64, seed + 10)
    errors = {}
    for mode in ("seed", "quality"):
        layer = make_layer(48, 64, seed=seed)
        r = admm_sparse.prune_linear(layer, x, ratio, mode=mode, keep_bits=None, mask_structure=structure)
        errors[mode] = r.relative_error
        assert r.mode == mode
    assert errors["quality"] <= errors["seed"] * (1 + 1e-4), errors


def test_quality_report_fields():
    layer = make_layer(32, 48)
    r = admm_sparse.prune_linear(layer, inputs("random", 200, 48, 3), 0.5, mode="quality", keep_bits=None)
    assert 1 <= r.iterations <= 300 and r.final_rho > 0
    assert r.error_after_refit <= r.error_before_refit + 1e-9
    assert r.relative_error == pytest.approx(r.error_after_refit, rel=1e-3)
    assert int((layer.weight == 0).sum()) >= int(32 * 48 * 0.5)
    seed = admm_sparse.prune_linear(make_layer(32, 48), inputs("random", 200, 48, 3), 0.5)
    assert seed.iterations is None and seed.mode == "seed"


def assert_representable(w, scaler, keep_proportion=0.02, keep_bits=2):
    w16 = w.to(torch.float16)
    assert torch.equal(keepbits.apply_keepbits(w16, scaler, keep_bits, keep_proportion), w16)
    off_grid = w16 != keepbits.round_float16(w16, None, keep_bits)
    assert int(off_grid.sum()) <= quality.keep_budget(w.numel(), keep_proportion)


@pytest.mark.parametrize("mode", ["quality", "seed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("structure,ratio", [("unstructured", 0.3), ("2:4", None)])
def test_round_in_admm_exactly_representable(mode, dtype, structure, ratio):
    layer = make_layer(40, 64, dtype)
    x = inputs("correlated", 300, 64, 4).to(dtype)
    pruner = admm_sparse.AdmmPruner(layer)
    pruner.add_batch(x)
    r = pruner.fasterprune(ratio, mode=mode, round_in_admm=True, mask_structure=structure)
    w = layer.weight.detach()
    assert_representable(w, pruner.scaler)
    assert r.error_before_rounding <= r.relative_error
    if structure == "2:4":
        assert ((w != 0).reshape(40, 16, 4).sum(-1) <= 2).all()
    else:
        assert int((w == 0).sum()) >= int(w.numel() * 0.3)


def test_round_in_admm_default_on_in_quality_mode_and_not_worse():
    x = inputs("correlated", 600, 96, 5)
    errs = {}
    for kw in (dict(round_in_admm=False), dict()):
        layer = make_layer(64, 96)
        r = admm_sparse.prune_linear(layer, x, 0.3, mode="quality", **kw)
        errs[bool(kw)] = r.relative_error
        assert (r.error_before_rounding is not None) == (not kw)
    assert errs[False] <= errs[True] * 1.001, errs


@pytest.mark.parametrize("mode", ["seed", "quality"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rounding_with_compensation_beats_post_hoc_rounding(mode, seed):
    x = inputs("correlated", 800, 128, seed)
    errs = {}
    for round_in_admm in (False, True):
        layer = make_layer(96, 128, seed=seed)
        errs[round_in_admm] = admm_sparse.prune_linear(layer, x, 0.3, mode=mode, round_in_admm=round_in_admm).relative_error
    assert errs[True] < errs[False], errs


def assert_rejected(match, exc=ValueError, **kw):
    layer = make_layer(8, 16)
    w0 = layer.weight.detach().clone()
    with pytest.raises(exc, match=match):
        admm_sparse.prune_linear(layer, inputs("random", 40, 16, 0), 0.5, **kw)
    assert torch.equal(layer.weight.detach(), w0), "the layer must be untouched"


@pytest.mark.parametrize("bad", ["Quality", "turbo", "", None, 1])
def test_bad_mode(bad):
    assert_rejected("mode must be one of", mode=bad)


def test_bad_quality_options():
    assert_rejected("round_in_admm must be", round_in_admm="yes")
    assert_rejected("needs keep_bits", round_in_admm=True, keep_bits=None)
    assert_rejected("quality_max_iters", mode="quality", quality_max_iters=0)
    assert_rejected("quality_rho", mode="quality", quality_rho=-1.0)
