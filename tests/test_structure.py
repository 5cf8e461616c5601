"""Mask structures (per_row, N:M): the native selections against brute force and the reference, the
structured ADMM against the reference, and prune_linear's structure option with its bad inputs."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import admm_sparse
from admm_sparse import _ops
from admm_sparse import reference as ref


def values(rows, cols, seed, levels):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(rows, cols, generator=g)
    if levels:  # few distinct magnitudes, both signs, +-0: heavy ties
        v = torch.round(v * levels / 3) / levels
        v[v == 0] = torch.where(torch.rand(int((v == 0).sum()), generator=g) < 0.5, 0.0, -0.0)
    return v


def brute_rows(v, k):
    """Plain Python: in each row, the k entries first in (|v|, column) order."""
    out = torch.zeros(v.shape, dtype=torch.bool)
    for r in range(v.shape[0]):
        order = sorted(range(v.shape[1]), key=lambda c: (abs(float(v[r, c])), c))
        out[r, order[:k]] = True
    return out


def brute_nm(v, n, m):
    out = torch.zeros(v.shape, dtype=torch.bool)
    for r in range(v.shape[0]):
        for g0 in range(0, v.shape[1], m):
            order = sorted(range(g0, g0 + m), key=lambda c: (abs(float(v[r, c])), c))
            out[r, order[: m - n]] = True
    return out


@given(rows=st.integers(0, 12), cols=st.integers(0, 40), k_frac=st.floats(0, 1), levels=st.sampled_from([0, 2, 20]),
       seed=st.integers(0, 2**16))
def test_prune_mask_rows_matches_brute_force(rows, cols, k_frac, levels, seed):
    v = values(rows, cols, seed, levels)
    k = int(cols * k_frac)
    mask = _ops.prune_mask_rows(v, k)
    assert mask.dtype == torch.bool and mask.shape == v.shape
    assert torch.equal(mask.sum(1), torch.full((rows,), k))
    assert torch.equal(mask, brute_rows(v, k))
    assert torch.equal(mask, ref.prune_mask_rows(v, k))


NM = [(1, 1), (1, 2), (2, 4), (4, 8), (1, 4), (3, 4), (8, 16), (5, 7), (16, 32), (0, 4), (4, 4), (63, 64), (1, 64)]


@given(rows=st.integers(0, 10), groups=st.integers(0, 6), nm=st.sampled_from(NM), levels=st.sampled_from([0, 2, 20]),
       seed=st.integers(0, 2**16))
def test_prune_mask_nm_matches_brute_force(rows, groups, nm, levels, seed):
    n, m = nm
    v = values(rows, groups * m, seed, levels)
    mask = _ops.prune_mask_nm(v, n, m)
    assert mask.shape == v.shape and mask.dtype == torch.bool
    if v.numel():
        assert torch.equal(mask.reshape(rows, groups, m).sum(-1), torch.full((rows, groups), m - n))
    assert torch.equal(mask, brute_nm(v, n, m))
    assert torch.equal(mask, ref.prune_mask_nm(v, n, m))


@pytest.mark.parametrize("shape", [(3, 70000), (300, 512), (1, 1)])
def test_structured_masks_large_and_tied(shape):
    v = torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(0)).float() * 0.5
    for k in {0, 1, shape[1] // 3, shape[1]}:
        assert torch.equal(_ops.prune_mask_rows(v, k), ref.prune_mask_rows(v, k))
    if shape[1] % 4 == 0:
        assert torch.equal(_ops.prune_mask_nm(v, 2, 4), ref.prune_mask_nm(v, 2, 4))


def test_structured_masks_non_contiguous():
    base = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    view = base.t()[:, ::2]  # [96, 32]
    assert torch.equal(_ops.prune_mask_rows(view, 10), ref.prune_mask_rows(view, 10))
    assert torch.equal(_ops.prune_mask_nm(view, 2, 4), ref.prune_mask_nm(view, 2, 4))


def test_structured_masks_reject_bad_arguments():
    v = torch.randn(4, 12)
    with pytest.raises(RuntimeError, match="k must be in"):
        _ops.prune_mask_rows(v, 13)
    with pytest.raises(RuntimeError, match="matrix"):
        _ops.prune_mask_rows(torch.randn(12), 1)
    with pytest.raises(RuntimeError, match="float32"):
        _ops.prune_mask_nm(v.double(), 2, 4)
    with pytest.raises(RuntimeError, match="multiple of m=5"):
        _ops.prune_mask_nm(v, 2, 5)
    with pytest.raises(RuntimeError, match="n <= m"):
        _ops.prune_mask_nm(v, 5, 4)
    with pytest.raises(RuntimeError, match="m <= 64"):
        _ops.prune_mask_nm(torch.randn(2, 128), 2, 128)


def admm_case(d_out, d_in, tokens, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g)
    if ties:
        w = torch.round(w * 2) / 2
    x = torch.randn(tokens, d_in, generator=g)
    h = x.T @ x
    return h.tril() + h.tril(-1).T, w


def structure_k(structure, d_out, d_in, ratio):
    if structure == "per_row":
        return d_out * int(d_in * ratio)
    n, m = map(int, structure.split(":"))
    return d_out * (d_in // m) * (m - n)


def assert_structure(out, structure, ratio):
    d_out, d_in = out.shape
    zeros = out == 0
    if structure == "per_row":
        assert (zeros.sum(1) >= int(d_in * ratio)).all()
    else:
        n, m = map(int, structure.split(":"))
        assert ((~zeros).reshape(d_out, d_in // m, m).sum(-1) <= n).all()


@given(d_out=st.integers(1, 24), groups=st.integers(1, 8), tokens=st.integers(1, 60),
       structure=st.sampled_from(["per_row", "2:4", "4:8", "1:4", "3:4"]), ratio=st.sampled_from([0.0, 0.3, 0.5, 0.9]),
       ties=st.booleans(), seed=st.integers(0, 2**16))
def test_structured_admm_matches_reference(d_out, groups, tokens, structure, ratio, ties, seed):
    d_in = groups * 8
    h, w = admm_case(d_out, d_in, tokens, seed, ties)
    k = structure_k(structure, d_out, d_in, ratio)
    out, _, _ = _ops.admm_prune(h, w, k, 0.1, 1.0, 20, 15, structure)
    expected = ref.admm_prune(h, w, k, structure=structure)
    assert int((out == 0).sum()) >= k
    assert_structure(out, structure, ratio)
    d = h.diagonal().sqrt() + 1e-8
    a, b = out * d, expected * d
    tol = 1e-5 * (1 + b.abs().max().item())
    torch.testing.assert_close(a, b, rtol=1e-4, atol=tol)


def test_admm_prune_structure_errors():
    h, w = admm_case(4, 12, 30, 0)
    with pytest.raises(RuntimeError, match=r"divisible by 8, got a weight of shape \[4, 12\]"):
        _ops.admm_prune(h, w, 16, 0.1, 1.0, 20, 15, "4:8")
    with pytest.raises(RuntimeError, match="prunes exactly 24"):
        _ops.admm_prune(h, w, 10, 0.1, 1.0, 20, 15, "2:4")
    with pytest.raises(RuntimeError, match="same count"):
        _ops.admm_prune(h, w, 10, 0.1, 1.0, 20, 15, "per_row")
    for bad in ("2:", "a:b", "5:4", "0:4", "2:4:8", "rows", "", "1:128"):
        with pytest.raises(RuntimeError, match="mask structure must be"):
            _ops.admm_prune(h, w, 0, 0.1, 1.0, 20, 15, bad)


def test_opcheck_structured_ops():
    h, w = admm_case(12, 16, 40, 5)
    torch.library.opcheck(torch.ops.admm_sparse.prune_mask_rows, (w, 5))
    torch.library.opcheck(torch.ops.admm_sparse.prune_mask_nm, (w, 2, 4))
    torch.library.opcheck(torch.ops.admm_sparse.admm_prune, (h, w, 12 * 8, 0.1, 1.0, 6, 4, "2:4"))
    torch.library.opcheck(torch.ops.admm_sparse.admm_prune, (h, w, 12 * 5, 0.1, 1.0, 6, 4, "per_row"))


# ---------------------------------------------------------------- prune_linear


def make_layer(d_out, d_in, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out).to(dtype)


def calib(shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("structure", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("keep_bits", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prune_linear_nm_counts_every_group(structure, keep_bits, dtype):
    n, m = map(int, structure.split(":"))
    layer = make_layer(40, 64, dtype)
    x = calib((3, 50, 64), dtype)
    report = admm_sparse.prune_linear(layer, x, mask_structure=structure, keep_bits=keep_bits)
    w = layer.weight.detach()
    assert ((w != 0).reshape(40, 64 // m, m).sum(-1) <= n).all()
    assert report.sparse_ratio == pytest.approx(1 - n / m)
    assert report.sparsity >= 1 - n / m
    # An explicit ratio equal to 1 - N/M is accepted and gives the same weights.
    again = make_layer(40, 64, dtype)
    admm_sparse.prune_linear(again, x, 1 - n / m, mask_structure=structure, keep_bits=keep_bits)
    assert torch.equal(again.weight, layer.weight)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_prune_linear_per_row_counts_every_row(ratio):
    layer = make_layer(48, 70)
    w0 = layer.weight.detach().clone()
    x = calib((400, 70))
    admm_sparse.prune_linear(layer, x, ratio, mask_structure="per_row", keep_bits=None)
    w = layer.weight.detach()
    assert ((w == 0).sum(1) >= int(70 * ratio)).all()
    expected = ref.admm_prune(x.T @ x, w0, 48 * int(70 * ratio), structure="per_row")
    torch.testing.assert_close(w, expected, rtol=1e-3, atol=1e-4)


def test_structures_error_order_on_correlated_inputs():
    # More freedom, less error: unstructured <= per_row <= 4:8 <= 2:4 at the same sparsity 0.5.
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(64, 64, generator=g) / 8 + torch.eye(64)
    x = torch.randn(600, 64, generator=g) @ mix * torch.linspace(0.2, 3, 64)
    errs = {}
    for s in ["unstructured", "per_row", "4:8", "2:4"]:
        layer = make_layer(64, 64)
        errs[s] = admm_sparse.prune_linear(layer, x, 0.5, mask_structure=s, keep_bits=None).relative_error
    assert errs["unstructured"] <= errs["per_row"] * 1.02 <= errs["4:8"] * 1.05 <= errs["2:4"] * 1.1, errs


def assert_rejected(layer, x, exc, match, ratio=None, **kw):
    w0 = layer.weight.detach().clone()
    with pytest.raises(exc, match=match):
        admm_sparse.prune_linear(layer, x, ratio, **kw)
    assert torch.equal(layer.weight.detach(), w0), "the layer must be untouched"
    pruner = admm_sparse.AdmmPruner(layer)
    pruner.add_batch(x)
    with pytest.raises(exc, match=match):
        pruner.fasterprune(ratio, **kw)
    assert torch.equal(layer.weight.detach(), w0), "the layer must be untouched"


@pytest.mark.parametrize("bad", ["2:", "two:four", "5:4", "0:4", "2:4:8", "rows", "", "1:65", 4, None])
def test_bad_structure_string(bad):
    assert_rejected(make_layer(8, 16), calib((30, 16)), ValueError, "mask_structure must be", mask_structure=bad)


def test_in_features_not_a_multiple_of_m():
    assert_rejected(make_layer(8, 10), calib((30, 10)), ValueError, r"divisible by 4.*shape \(8, 10\)",
                    mask_structure="2:4")


@pytest.mark.parametrize("ratio", [0.3, 0.0, 0.75])
def test_ratio_contradicting_nm(ratio):
    assert_rejected(make_layer(8, 16), calib((30, 16)), ValueError, "contradicts", ratio, mask_structure="2:4")


def test_default_ratio_unchanged_for_unstructured():
    a, b = make_layer(16, 24), make_layer(16, 24)
    x = calib((80, 24))
    ra = admm_sparse.prune_linear(a, x)
    rb = admm_sparse.prune_linear(b, x, 0.3, mask_structure="unstructured")
    assert torch.equal(a.weight, b.weight) and ra.sparse_ratio == 0.3
