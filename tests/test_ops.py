"""Native ops (admm_sparse._ops) against their plain-PyTorch twins in admm_sparse.reference."""
import contextlib
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from admm_sparse import _ops
from admm_sparse import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(seed, shape, dtype=torch.float32, zero_channels=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    for c in zero_channels:
        x[..., c] = 0
    return x


def stats_of(x_batches, d_in, fn):
    h = torch.zeros(d_in, d_in, dtype=torch.float64)
    s = torch.zeros(d_in, dtype=torch.float64)
    for x in x_batches:
        fn(h, s, x)
    return h, s


@given(d_in=st.integers(1, 70), shapes=st.lists(st.sampled_from(["2d", "3d"]), min_size=1, max_size=3),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_accumulate_sums_matches_reference(d_in, shapes, dtype, seed):
    batches = [make_inputs(seed + i, (7, d_in) if kind == "2d" else (2, 5, d_in), dtype)
               for i, kind in enumerate(shapes)]
    h, s = stats_of(batches, d_in, _ops.accumulate_sums)
    h_ref, s_ref = stats_of(batches, d_in, ref.accumulate_sums)
    torch.testing.assert_close(h.tril(), h_ref.tril(), rtol=1e-5, atol=1e-4)
    assert torch.count_nonzero(h.triu(1)) == 0, "the upper triangle must stay untouched"
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_accumulate_sums_spans_several_triangle_blocks():
    d_in = 600  # > the CPU column block of 256: diagonal, off-diagonal panels and ragged last blocks
    x = make_inputs(0, (3, 40, d_in), zero_channels=(0, 299, 599))
    h, s = stats_of([x, x[0]], d_in, _ops.accumulate_sums)
    h_ref, s_ref = stats_of([x, x[0]], d_in, ref.accumulate_sums)
    torch.testing.assert_close(h.tril(), h_ref.tril(), rtol=1e-5, atol=1e-3)
    assert torch.count_nonzero(h.triu(1)) == 0
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-6)
    assert h[299, 299] == 0 and s[599] == 0


def test_accumulate_sums_are_the_same_in_any_split_of_the_batches():
    """What makes N processes prune the model of one: the batches' sums, taken in any grouping and order (as
    ranks summing their share and then each other's), are bitwise equal once rounded to float32."""
    d_in = 300
    batches = [make_inputs(i, (64, d_in)) * (10.0 ** (i % 3)) for i in range(8)]

    def grouped(parts):
        h, s = torch.zeros(d_in, d_in, dtype=torch.float64), torch.zeros(d_in, dtype=torch.float64)
        for part in parts:
            hp, sp = stats_of([batches[i] for i in part], d_in, _ops.accumulate_sums)
            h += hp
            s += sp
        return h.float(), s.float()

    h1, s1 = grouped([range(8)])
    for parts in ([range(0, 8, 2), range(1, 8, 2)], [range(0, 8, 3), range(1, 8, 3), range(2, 8, 3)],
                  [[7, 6, 5, 4, 3, 2, 1, 0]]):
        h, s = grouped(parts)
        assert torch.equal(h, h1) and torch.equal(s, s1)
    # The float32 running sums they replace differ in these splits.
    h32 = [sum((x.T @ x for x in (batches[i] for i in part)), torch.zeros(d_in, d_in))
           for part in (range(0, 8, 2), range(1, 8, 2))]
    assert not torch.equal(h32[0] + h32[1], sum((x.T @ x for x in batches), torch.zeros(d_in, d_in)))


@pytest.mark.parametrize("path", ["native op", "wrapper", "generic"])
def test_statistics_ignore_a_callers_autocast(path):
    """The statistics are float32 products summed in float64 also inside an autocast region (the calibration
    passes run in one): bitwise what they are outside it, where a bfloat16 GEMM would round the products."""
    from admm_sparse import device as devices

    x = make_inputs(0, (2, 256, 300), torch.bfloat16) * torch.logspace(-2, 2, 300).bfloat16()
    fn = {"native op": torch.ops.admm_sparse.accumulate_sums, "wrapper": _ops.accumulate_sums,
          "generic": _ops.accumulate_sums}[path]
    with devices.generic_kernels() if path == "generic" else contextlib.nullcontext():
        outside = stats_of([x], 300, fn)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = stats_of([x], 300, fn)
            rounded = (x[0].T @ x[0]).dtype  # what autocast does to a GEMM that is not guarded
    assert rounded == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(inside, outside))


def test_admm_prune_ignores_a_callers_autocast():
    h, w = admm_case(40, 64, 200, 5)
    outside = _ops.admm_prune(h, w, 1280, 0.1, 1.0, 20, 15)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = _ops.admm_prune(h, w, 1280, 0.1, 1.0, 20, 15)
        inverse_inside = _ops.damped_cholesky_inverse(h, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(inside, outside))
    assert all(torch.equal(a, b) for a, b in zip(inverse_inside, _ops.damped_cholesky_inverse(h, 1.0)))


def test_accumulate_sums_refuses_float32_sums():
    with pytest.raises(RuntimeError, match="float64"):
        _ops.accumulate_sums(torch.zeros(4, 4), torch.zeros(4, dtype=torch.float64), torch.randn(3, 4))


@given(n=st.integers(0, 300), k_frac=st.floats(0, 1), levels=st.sampled_from([0, 3, 50]), seed=st.integers(0, 2**16))
def test_prune_mask_matches_reference(n, k_frac, levels, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g)
    if levels:  # few distinct magnitudes: many ties, both signs, zeros
        v = torch.round(v * levels / 3) / levels
    k = int(n * k_frac)
    mask = _ops.prune_mask(v, k)
    assert mask.dtype == torch.bool and mask.shape == v.shape
    assert int(mask.sum()) == k
    assert torch.equal(mask, ref.prune_mask(v, k))


@pytest.mark.parametrize("shape", [(300, 500), (2, 65536), (65537,), (1, 1), (0,)])
@pytest.mark.parametrize("k_frac", [0.0, 0.3, 0.95, 1.0])
def test_prune_mask_chunk_boundaries_and_ties(shape, k_frac):
    g = torch.Generator().manual_seed(1)
    v = torch.randint(-4, 5, shape, generator=g).float() * 0.25  # heavy ties spanning 64K-element chunks
    k = int(v.numel() * k_frac)
    mask = _ops.prune_mask(v, k)
    assert int(mask.sum()) == k
    assert torch.equal(mask, ref.prune_mask(v, k))


# The CPU select samples a bracket around the k-th smallest on inputs of 2^18 entries or more and runs its
# radix select on the bracket's entries only; these sizes are above that and not multiples of its chunks.
LARGE = 2**18 + 4099


@pytest.mark.parametrize("kind", ["normal", "ties", "all_equal", "zeros_and_normal", "tiny_and_huge"])
@pytest.mark.parametrize("k", [1, int(LARGE * 0.3), int(LARGE * 0.97), LARGE - 1])
def test_prune_mask_large_inputs(kind, k):
    g = torch.Generator().manual_seed(k)
    v = torch.randn(LARGE, generator=g)
    if kind == "ties":
        v = torch.randint(-6, 7, (LARGE,), generator=g).float() * 0.125
    elif kind == "all_equal":
        v = torch.full((LARGE,), -1.5)
    elif kind == "zeros_and_normal":
        v[torch.rand(LARGE, generator=g) < 0.3] = 0.0
    elif kind == "tiny_and_huge":  # magnitudes spanning the whole exponent range, subnormals included
        v = v * torch.exp2(torch.randint(-140, 120, (LARGE,), generator=g).float())
    mask = _ops.prune_mask(v, k)
    assert int(mask.sum()) == k
    assert torch.equal(mask, ref.prune_mask(v, k))


def test_prune_mask_when_the_sample_misleads():
    # Put large values exactly at the positions the CPU select samples (its golden-ratio sequence) and small
    # ones everywhere else: the sampled bracket then misses the k-th smallest and the select must fall back
    # to the radix select over all entries, with the same result.
    import math
    n, samples = LARGE, 2**15
    sampled = [min(n - 1, int(math.fmod(0.5 + j * 0.6180339887498949, 1.0) * n)) for j in range(samples)]
    v = torch.rand(n, generator=torch.Generator().manual_seed(7))
    v[sampled] += 10.0
    for k in (n // 2, n - 2 * samples):
        mask = _ops.prune_mask(v, k)
        assert torch.equal(mask, ref.prune_mask(v, k))


def test_prune_mask_rejects_bad_k():
    with pytest.raises(RuntimeError, match="k must be in"):
        _ops.prune_mask(torch.randn(5), 6)
    with pytest.raises(RuntimeError, match="float32"):
        _ops.prune_mask(torch.randn(5).double(), 1)


def random_spd(n, seed, tokens=None):
    x = make_inputs(seed, (tokens or 2 * n, n))
    return x.T @ x


@pytest.mark.parametrize("n", [1, 5, 64, 300])
def test_damped_cholesky_inverse_matches_reference(n):
    a = random_spd(n, n)
    inv, shift = _ops.damped_cholesky_inverse(a, 0.5)
    assert float(shift) == 0.5
    torch.testing.assert_close(inv, ref.damped_cholesky_inverse(a, 0.5), rtol=1e-4, atol=1e-5)


def test_a_shift_float32_cannot_hold_exactly_is_not_reported_as_more_damping():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, shift = _ops.damped_cholesky_inverse(random_spd(8, 8), 1.1)  # 1.1 is 1.10000002 in float32
    assert float(shift) == float(torch.tensor(1.1))


@pytest.mark.parametrize("matrix", [torch.zeros(4, 4), -torch.eye(6), torch.ones(5, 5) - 2 * torch.eye(5)])
def test_damped_cholesky_inverse_retries_when_not_positive_definite(matrix):
    with pytest.warns(UserWarning, match="not positive definite"):
        inv, shift = _ops.damped_cholesky_inverse(matrix, 0.0)
    assert float(shift) > 0 and torch.isfinite(inv).all()
    n = matrix.shape[0]
    shifted = matrix + float(shift) * torch.eye(n)
    torch.testing.assert_close(inv @ shifted, torch.eye(n), rtol=0, atol=1e-3)


def test_damped_cholesky_inverse_rejects_nan():
    with pytest.raises(RuntimeError, match="NaN"):
        _ops.damped_cholesky_inverse(torch.full((3, 3), float("nan")), 1.0)


def admm_case(d_out, d_in, tokens, seed, ties=False, zero_channels=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g)
    if ties:
        w = torch.round(w * 2) / 2  # quantized weights: many equal magnitudes
    x = make_inputs(seed + 1, (tokens, d_in), zero_channels=zero_channels)
    h = x.T @ x
    return h.tril() + h.tril(-1).T, w  # exactly symmetric: the native op reads only the lower triangle


def assert_same_pruning(out, expected, h, k):
    """Equal up to float32 rounding where it matters: in the normalised space W·d, where an input
    channel's scale d = sqrt(H_jj) weights its error as the layer's output does."""
    d = h.diagonal().sqrt() + 1e-8
    a, b = out * d, expected * d
    tol = 1e-5 * (1 + b.abs().max().item())
    torch.testing.assert_close(a, b, rtol=1e-4, atol=tol)
    assert int((out == 0).sum()) >= k and int((expected == 0).sum()) >= k
    # The same entries are zero, except noise-level ones (weights of ~zero input energy).
    differ = (out == 0) != (expected == 0)
    assert (a[differ].abs() <= tol).all() and (b[differ].abs() <= tol).all()


@given(d_out=st.integers(1, 40), d_in=st.integers(1, 40), tokens=st.integers(1, 80),
       ratio=st.sampled_from([0.0, 0.3, 0.5, 0.95]) | st.floats(0, 0.99), ties=st.booleans(),
       zero_channel=st.booleans(), seed=st.integers(0, 2**16))
def test_admm_prune_matches_reference(d_out, d_in, tokens, ratio, ties, zero_channel, seed):
    h, w = admm_case(d_out, d_in, tokens, seed, ties, zero_channels=(0,) if zero_channel else ())
    k = int(d_out * d_in * ratio)
    out, damping, dense = _ops.admm_prune(h, w, k, 0.1, 1.0, 20, 15)
    expected = ref.admm_prune(h, w, k)
    assert out.shape == w.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    # The native loop performs the reference's float32 operations in the same order.
    assert_same_pruning(out, expected, h, k)
    d = h.diagonal().sqrt() + 1e-8
    hn = h / d[:, None] / d[None, :]
    assert float(damping[1]) == 0
    torch.testing.assert_close(float(damping[0]), 0.1 * hn.diagonal().mean().item(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(float(dense), (w @ h @ w.T).trace().item(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.7])
def test_admm_prune_exactly_k_zeros_and_lower_triangle_only(ratio):
    h, w = admm_case(96, 130, 400, 3)
    k = int(w.numel() * ratio)
    out, _, _ = _ops.admm_prune(h.tril(), w, k, 0.1, 1.0, 20, 15)  # the upper triangle is never read
    assert int((out == 0).sum()) == k
    assert_same_pruning(out, ref.admm_prune(h, w, k), h, k)


def assert_same_tie_break(h, w, k):
    out, _, _ = _ops.admm_prune(h, w, k, 0.1, 1.0, 20, 15)
    expected = ref.admm_prune(h, w, k)
    assert int((out == 0).sum()) == k
    assert torch.equal(out == 0, expected == 0)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_admm_prune_ties_across_several_chunks():
    # 200 x 400 = 80000 entries: two 64K-element chunks of the CPU select, with few distinct |W|, so that some
    # chunks take all their ties at the threshold, one takes part of them and some none. The diagonal Hessian
    # decouples the entries: equal |W| stay exactly equal |V| through all iterations, so the masks depend on
    # the tie-break alone (lowest flat index of the iterate Wn) and must agree exactly with the reference's.
    w = torch.randint(-3, 4, (200, 400), generator=torch.Generator().manual_seed(4)).float() * 0.5
    h = torch.eye(400) * 2.0
    for ratio in (0.2, 0.5, 0.9):
        assert_same_tie_break(h, w, int(w.numel() * ratio))


def test_admm_prune_ties_on_a_large_layer():
    # As above on 520 x 520 entries, where the select works on a sampled bracket (see LARGE). The diagonal
    # differs per input channel, so the exact ties are those within one input channel (one row of Wn).
    w = torch.randint(-5, 6, (520, 520), generator=torch.Generator().manual_seed(5)).float() * 0.25
    h = torch.diag(torch.rand(520, generator=torch.Generator().manual_seed(6)) + 0.5)
    assert_same_tie_break(h, w, int(w.numel() * 0.45))


def test_admm_prune_rejects_bad_arguments():
    h, w = admm_case(4, 6, 20, 0)
    with pytest.raises(RuntimeError, match="prune_iters"):
        _ops.admm_prune(h, w, 3, 0.1, 1.0, 5, 6)
    with pytest.raises(RuntimeError, match="hessian must be 6 x 6"):
        _ops.admm_prune(h[:5, :5], w, 3, 0.1, 1.0, 20, 15)
    with pytest.raises(RuntimeError, match="k must be in"):
        _ops.admm_prune(h, w, 25, 0.1, 1.0, 20, 15)
    with pytest.raises(RuntimeError, match="rho"):
        _ops.admm_prune(h, w, 3, 0.1, 0.0, 20, 15)


def test_opcheck_every_op():
    h, w = admm_case(12, 10, 30, 5)
    x = make_inputs(9, (2, 6, 10))
    torch.library.opcheck(torch.ops.admm_sparse.accumulate_sums,
                          (torch.zeros(10, 10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64), x))
    torch.library.opcheck(torch.ops.admm_sparse.damped_cholesky_inverse, (h, 1.0))
    torch.library.opcheck(torch.ops.admm_sparse.prune_mask, (w, 40))
    torch.library.opcheck(torch.ops.admm_sparse.admm_prune, (h, w, 40, 0.1, 1.0, 20, 15))
