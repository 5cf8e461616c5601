"""The benchmark baselines (benchmarks/baselines.py) against brute-force and textbook references."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package

from benchmarks.baselines import (  # noqa: E402
    MagnitudePruner,
    SparseGPTPruner,
    WandaPruner,
    magnitude_prune,
    nm_mask,
    relative_output_error,
    row_smallest_mask,
    smallest_mask,
    sparsegpt_prune,
    wanda_prune,
)


def correlated_inputs(tokens, d_in, seed=0, dtype=torch.float64):
    """Inputs with correlated channels of different scales, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=dtype) / d_in**0.5 + torch.eye(d_in, dtype=dtype)
    scale = torch.rand(d_in, generator=g, dtype=dtype) * 3 + 0.1
    return (torch.randn(tokens, d_in, generator=g, dtype=dtype) @ mix) * scale


def random_weight(d_out, d_in, seed=1, dtype=torch.float64):
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- masks against sorting in plain Python ---


def test_smallest_mask_matches_sorting():
    score = torch.rand(7, 13, generator=torch.Generator().manual_seed(0))
    k = 40
    flat = score.flatten().tolist()
    expected = set(sorted(range(len(flat)), key=lambda i: flat[i])[:k])
    got = set(smallest_mask(score, k).flatten().nonzero().flatten().tolist())
    assert got == expected


def test_ties_go_to_lower_index():
    score = torch.tensor([[1.0, 0.5, 0.5, 0.5], [0.5, 1.0, 1.0, 0.5]])
    assert smallest_mask(score, 2).tolist() == [[False, True, True, False], [False] * 4]
    assert row_smallest_mask(score, 1).tolist() == [[False, True, False, False], [True, False, False, False]]
    assert nm_mask(score, 1, 2).tolist() == [[False, True, True, False], [True, False, False, True]]


def test_row_smallest_mask_matches_sorting():
    score = torch.rand(6, 20, generator=torch.Generator().manual_seed(1))
    mask = row_smallest_mask(score, 7)
    for r in range(6):
        row = score[r].tolist()
        expected = sorted(sorted(range(20), key=lambda i: row[i])[:7])
        assert mask[r].nonzero().flatten().tolist() == expected


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_structure(n, m):
    score = torch.rand(5, 32, generator=torch.Generator().manual_seed(2))
    mask = nm_mask(score, n, m)
    groups = mask.reshape(5, -1, m)
    assert (groups.sum(-1) == n).all()
    # the pruned ones are the n smallest of their group
    s = score.reshape(5, -1, m)
    assert (s.masked_fill(~groups, -1).amax(-1) <= s.masked_fill(groups, 2).amin(-1)).all()


def test_nm_needs_multiple_of_m():
    with pytest.raises(ValueError):
        nm_mask(torch.rand(2, 6), 2, 4)


# --- magnitude and Wanda ---


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_magnitude_exact_count_and_threshold(sparsity):
    W = random_weight(24, 40)
    P = magnitude_prune(W, sparsity)
    k = int(W.numel() * sparsity)
    zero = P == 0
    assert zero.sum().item() == k
    assert torch.equal(P[~zero], W[~zero])  # kept weights untouched
    if 0 < k < W.numel():
        assert W[zero].abs().max() <= W[~zero].abs().min()


def test_magnitude_nm():
    W = random_weight(8, 16)
    P = magnitude_prune(W, n=2, m=4)
    assert ((P == 0).reshape(8, 4, 4).sum(-1) == 2).all()
    assert torch.equal(P == 0, nm_mask(W.abs(), 2, 4))


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_wanda_per_row_against_sorting(sparsity):
    W = random_weight(10, 30)
    X = correlated_inputs(200, 30)
    norm = X.norm(dim=0)
    P = wanda_prune(W, norm, sparsity)
    k = int(30 * sparsity)
    for r in range(10):
        scores = [abs(W[r, j].item()) * norm[j].item() for j in range(30)]
        expected = sorted(sorted(range(30), key=lambda j: scores[j])[:k])
        assert (P[r] == 0).nonzero().flatten().tolist() == expected
    assert torch.equal(P[P != 0], W[P != 0])


def test_wanda_nm_and_differs_from_magnitude():
    W = random_weight(16, 32)
    norm = correlated_inputs(300, 32).norm(dim=0)
    P = wanda_prune(W, norm, n=2, m=4)
    assert ((P == 0).reshape(16, 8, 4).sum(-1) == 2).all()
    assert torch.equal(P == 0, nm_mask(W.abs() * norm, 2, 4))
    assert not torch.equal(P == 0, magnitude_prune(W, n=2, m=4) == 0)  # the activations matter


# --- SparseGPT against a column-by-column OBS loop in float64 ---


def obs_reference(W, H, sparsity=0.0, n=0, m=0, mask_blocksize=128, percdamp=0.01):
    """Textbook OBS, one column at a time: invert the Hessian of the columns still free (j..)
    afresh at every step and move the pruned weights' error onto them. Masks are chosen every
    `mask_blocksize` columns (or every m for N:M) by w^2 / [H_{c..}^-1]_cc, with the same quota
    per block as the implementation."""
    W = W.double().clone()
    H = H.double().clone()
    d_out, d_in = W.shape
    dead = torch.diag(H) == 0
    for i in range(d_in):
        if dead[i]:
            H[i, i] = 1
            W[:, i] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(d_in, dtype=H.dtype)
    k_total = int(d_out * d_in * sparsity)
    mask = torch.zeros(d_out, d_in, dtype=torch.bool)
    step = m if m else mask_blocksize
    for j in range(d_in):
        if j % step == 0:
            e = min(j + step, d_in)
            obs_diag = torch.stack([torch.linalg.inv(H[c:, c:])[0, 0] for c in range(j, e)])
            score = W[:, j:e] ** 2 / obs_diag
            if m:
                mask[:, j:e] = nm_mask(score, n, m)
            else:
                k = k_total * e // d_in - k_total * j // d_in
                mask[:, j:e] = smallest_mask(score, k)
        Hinv = torch.linalg.inv(H[j:, j:])
        err = W[:, j] * mask[:, j] / Hinv[0, 0]
        W[:, j:] -= err[:, None] * Hinv[0][None, :]
    W[mask] = 0
    return W


@pytest.mark.parametrize(
    "sparsity,n,m,blocksize,mask_blocksize",
    [
        (0.5, 0, 0, 48, 48),  # blocksize = d_in: one lazy block, one mask block
        (0.7, 0, 0, 48, 48),
        (0.5, 0, 0, 48, 16),  # mask blocks inside the lazy block
        (0.3, 0, 0, 8, 16),  # lazy blocks inside a mask block
        (0.5, 0, 0, 16, 16),
        (0.0, 2, 4, 48, 48),
        (0.0, 2, 4, 8, 8),
    ],
)
def test_sparsegpt_equals_obs_loop(sparsity, n, m, blocksize, mask_blocksize):
    d_out, d_in = 12, 48
    W = random_weight(d_out, d_in)
    X = correlated_inputs(400, d_in)
    H = X.T @ X
    got, damp = sparsegpt_prune(W, H, sparsity, n, m, blocksize, mask_blocksize)
    want = obs_reference(W, H, sparsity, n, m, mask_blocksize)
    assert damp == pytest.approx(0.01 * torch.diag(H).mean().item())
    assert torch.equal(got == 0, want == 0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    if m:
        assert ((got == 0).reshape(d_out, -1, m).sum(-1) == n).all()
    else:
        assert (got == 0).sum().item() == int(d_out * d_in * sparsity)


def test_sparsegpt_lazy_blocksize_does_not_change_result():
    W = random_weight(20, 64)
    H = (lambda X: X.T @ X)(correlated_inputs(500, 64, seed=3))
    a, _ = sparsegpt_prune(W, H, 0.6, blocksize=64, mask_blocksize=32)
    b, _ = sparsegpt_prune(W, H, 0.6, blocksize=4, mask_blocksize=32)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_sparsegpt_is_least_squares_when_pruned_columns_come_first():
    """If the pruned weights all sit in the first columns, every kept weight is still free when
    they are removed, so OBS gives the exact least-squares answer: w_K += H_KK^-1 H_KP w_P."""
    d_out, d_in, p = 6, 20, 5
    W = random_weight(d_out, d_in)
    W[:, :p] *= 1e-6  # makes the first p columns the cheapest to prune
    H = (lambda X: X.T @ X)(correlated_inputs(300, d_in, seed=4))
    got, damp = sparsegpt_prune(W, H, sparsity=p / d_in, blocksize=d_in, mask_blocksize=d_in)
    assert torch.equal((got == 0).nonzero()[:, 1].unique(), torch.arange(p))
    Hd = H + damp * torch.eye(d_in, dtype=H.dtype)
    K = slice(p, d_in)
    want = W[:, K] + torch.linalg.solve(Hd[K, K], Hd[K, :p] @ W[:, :p].T).T
    torch.testing.assert_close(got[:, K], want, rtol=1e-9, atol=1e-9)


def test_sparsegpt_dead_input_and_zero_sparsity():
    W = random_weight(5, 16)
    X = correlated_inputs(100, 16)
    X[:, 3] = 0
    H = X.T @ X
    out, _ = sparsegpt_prune(W, H, 0.0)
    assert (out[:, 3] == 0).all()  # a dead input's weights are dropped
    keep = torch.arange(16) != 3
    torch.testing.assert_close(out[:, keep], W[:, keep], rtol=0, atol=1e-12)  # nothing else changes
    torch.testing.assert_close(out, obs_reference(W, H, 0.0))


def test_sparsegpt_beats_wanda_beats_magnitude_on_correlated_inputs():
    W = random_weight(32, 64)
    X = correlated_inputs(1000, 64, seed=5)
    H = X.T @ X
    err = {
        "magnitude": relative_output_error(W, magnitude_prune(W, 0.5), H),
        "wanda": relative_output_error(W, wanda_prune(W, X.norm(dim=0), 0.5), H),
        "sparsegpt": relative_output_error(W, sparsegpt_prune(W, H, 0.5)[0], H),
    }
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err


def test_relative_output_error_matches_direct():
    W = random_weight(9, 12)
    W2 = magnitude_prune(W, 0.5)
    X = correlated_inputs(50, 12)
    direct = ((W - W2) @ X.T).norm() / (W @ X.T).norm()
    assert relative_output_error(W, W2, X.T @ X) == pytest.approx(direct.item(), rel=1e-10)


# --- the pruner protocol used by the pipeline ---


@pytest.mark.parametrize("cls", [MagnitudePruner, WandaPruner, SparseGPTPruner])
@pytest.mark.parametrize("nm", [(0, 0), (2, 4)])
def test_pruner_protocol(cls, nm):
    torch.manual_seed(0)
    layer = nn.Linear(32, 24)
    W0 = layer.weight.detach().clone()
    p = cls(layer, *nm)
    X = correlated_inputs(2 * 10, 32, dtype=torch.float32).reshape(2, 10, 32)
    p.add_batch(X[:1])
    p.add_batch(X[1:])
    H = X.reshape(-1, 32).double().T @ X.reshape(-1, 32).double()
    torch.testing.assert_close(p.H.double(), H, rtol=1e-5, atol=1e-4)
    report = p.fasterprune(0.5)
    zero = layer.weight == 0
    assert report.tokens == 20 and report.shape == (24, 32)
    assert report.sparsity == pytest.approx(0.5) == zero.float().mean().item()
    if nm[1]:
        assert (zero.reshape(24, 8, 4).sum(-1) == 2).all()
    assert report.relative_error == pytest.approx(relative_output_error(W0, layer.weight.detach(), H), rel=1e-6)
    assert 0 < report.relative_error < 1 and report.seconds >= 0
    p.free()
    assert p.H is None


def test_wanda_pruner_uses_input_norms():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8, bias=False)
    W0 = layer.weight.detach().clone()
    X = correlated_inputs(64, 16, dtype=torch.float32)
    p = WandaPruner(layer)
    p.add_batch(X)
    p.fasterprune(0.5)
    torch.testing.assert_close(layer.weight.detach(), wanda_prune(W0, X.norm(dim=0), 0.5))


def test_sparsegpt_equals_bench_fast_transcription_of_algorithm1():
    """benchmarks/bench_fast.py's plain transcription of the paper's Algorithm 1 (the check on the baseline's
    speed) computes the same pruned weight as the baseline."""
    from benchmarks.bench_fast import algorithm1

    W = random_weight(8, 256)
    H = (lambda X: X.T @ X)(correlated_inputs(600, 256, seed=7))
    for d_in in (256, 200):  # 200: a last block shorter than the 128 of the others
        got, _ = sparsegpt_prune(W[:, :d_in], H[:d_in, :d_in], 0.5)
        want = algorithm1(W[:, :d_in], H[:d_in, :d_in], 0.5)
        assert torch.equal(got == 0, want == 0)
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", ["seed", "fast", "sparsegpt", "algorithm1"])
def test_bench_fast_takes_windows_of_tokens(method):
    """bench_fast.py --real feeds the built-in model's captured inputs, (windows, tokens, d_in): every method
    prunes them as it prunes the same tokens flattened."""
    from benchmarks.bench_fast import run

    X = correlated_inputs(2 * 96, 64, seed=3, dtype=torch.float32)
    W = random_weight(16, 64, dtype=torch.float32)
    layers = [torch.nn.Linear(64, 16, bias=False) for _ in range(2)]
    for layer, calib in zip(layers, ([X.reshape(2, 96, 64)], [X])):
        run(method, W, calib, layer, 0.5)
    assert torch.equal(layers[0].weight, layers[1].weight)
