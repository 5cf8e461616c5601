"""The CUDA kernels (csrc/cuda) against the CPU kernels and admm_sparse.reference, on two backends:

- "cuda": the extension's CUDA build on a GPU (skipped where there is none);
- "emulated": the same CUDA sources built for the CPU emulator of tests/cuda_emulator (a fiber per GPU
  thread, strict about barriers and warp collectives), so that the kernels run on every machine, CI
  included. The emulated admm_prune's GEMMs and Cholesky are the CPU's, so it must match the CPU op bit
  for bit.

prune_mask and the structured masks must match bit for bit on both (same radix select, same tie-break).
On a GPU admm_prune goes through cuBLAS/cuSOLVER instead of MKL/LAPACK, so it is compared with
tolerances, except where the Hessian is diagonal and the weights tie, which makes the masks exactly
comparable. Tests of what only a GPU has (streams, TF32, 2^31 elements, opcheck on CUDA tensors) skip
without one.
"""
import contextlib

import pytest
import torch
from cuda_emulator import build as emulator
from hypothesis import given
from hypothesis import strategies as st

from admm_sparse import _ops
from admm_sparse import reference as ref


@contextlib.contextmanager
def exact_cuda_gemms():
    """Skips without a GPU or without the CUDA kernels; float32 GEMMs without TF32 inside."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for op in ("prune_mask", "admm_prune"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"admm_sparse::{op}", "CUDA"):
            pytest.fail(f"admm_sparse::{op} has no CUDA kernel: the extension was built without CUDA; rebuild "
                        "with ADMM_SPARSE_CUDA=1 pip install --no-build-isolation -e .", pytrace=False)
    old = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old[0]
        torch.set_float32_matmul_precision(old[1])


class Backend:
    """Where the CUDA kernels run: `put` moves a CPU tensor there; the methods are the native ops."""

    def __init__(self, name: str):
        self.emulated = name == "emulated"
        # With its index: results come back on cuda:0, and torch.device("cuda") != torch.device("cuda:0").
        self.device = torch.device("cpu") if self.emulated else torch.device("cuda", torch.cuda.current_device())
        self.ops = emulator.load() if self.emulated else torch.ops.admm_sparse

    def put(self, t):
        return t.to(self.device)

    def prune_mask(self, v, k):
        return self.ops.prune_mask(self.put(v), k)

    def prune_mask_rows(self, v, k):
        return self.ops.prune_mask_rows(self.put(v), k)

    def prune_mask_nm(self, v, n, m):
        return self.ops.prune_mask_nm(self.put(v), n, m)

    def admm_prune(self, h, w, k, percdamp=0.1, rho=1.0, iters=20, prune_iters=15, structure="unstructured"):
        out, damping, energy = self.ops.admm_prune(self.put(h), self.put(w), k, percdamp, rho, iters, prune_iters,
                                                   structure)
        _ops.warn_if_damped(float(damping[1]))  # as admm_sparse._ops.admm_prune does
        return out, damping, energy


@pytest.fixture(scope="module", params=["cuda", "emulated"])
def backend(request):
    if request.param == "cuda":
        with exact_cuda_gemms():
            yield Backend("cuda")
    else:
        yield Backend("emulated")


@pytest.fixture
def gpu():
    """For tests of what only a real GPU has."""
    with exact_cuda_gemms():
        yield torch.device("cuda")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tied_values(shape, seed, levels=4):
    """Few distinct magnitudes, both signs and both zeros: heavy ties."""
    v = torch.randint(-levels, levels + 1, shape, generator=gen(seed)).float() * 0.25
    v[v == 0] = torch.where(torch.rand(int((v == 0).sum()), generator=gen(seed + 1)) < 0.5, 0.0, -0.0)
    return v


def check_mask(backend, v_cpu, k):
    """CUDA prune_mask == CPU prune_mask == reference, exactly k selected."""
    got = backend.prune_mask(v_cpu, k)
    assert got.device == backend.device and got.dtype == torch.bool and got.shape == v_cpu.shape
    got = got.cpu()
    assert int(got.sum()) == k
    assert torch.equal(got, _ops.prune_mask(v_cpu, k)), "CUDA and CPU masks differ"
    assert torch.equal(got, ref.prune_mask(v_cpu, k)), "CUDA mask differs from the reference"


# Sizes around the 256-thread block and the 1024-element minimum chunk, past 2^16, and large enough
# that the grid is capped and chunks hold many tiles.
SHAPES = [(1,), (2,), (255,), (256,), (257,), (1023,), (1025,), (33, 65), (3, 7, 11), (300, 257), (65537,),
          (1 << 17,), (1536, 1111), (4099, 1027)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_prune_mask_matches_cpu_and_reference(backend, shape, kind):
    v = torch.randn(shape, generator=gen(0)) if kind == "randn" else tied_values(shape, 0)
    n = v.numel()
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        check_mask(backend, v, k)


@pytest.mark.parametrize("n", [1000, 70000, 3_000_001])
def test_prune_mask_all_equal_takes_lowest_indices(backend, n):
    # Every entry ties: the selection is the first k flat indices, the cut falling inside some block.
    for fill in (1.5, 0.0, -0.0):
        v = torch.full((n,), fill)
        for k in (1, 255, 257, n // 3, n - 7):
            got = backend.prune_mask(v, k).cpu()
            expected = torch.zeros(n, dtype=torch.bool)
            expected[:k] = True
            assert torch.equal(got, expected), (fill, k)


def test_prune_mask_ties_in_every_block(backend):
    # The threshold magnitude sits in every block, with random signs; cuts at many places.
    n = 2_000_003
    v = torch.randn(n, generator=gen(3))
    v[::97] = 0.5 * torch.sign(v[::97])
    base = int((v.abs() < 0.5).sum())
    ties = int((v.abs() == 0.5).sum())
    for k in (base + 1, base + ties // 3, base + ties - 1, base + ties):
        check_mask(backend, v, k)


def test_prune_mask_special_values(backend):
    v = torch.randn(50_000, generator=gen(4))
    v[::11] = 0.0
    v[5::13] = -0.0
    v[7::17] = float("inf")
    v[9::19] = -float("inf")
    v[3::23] = 1e-40  # subnormal
    v[4::29] = -1e-40
    v[6::31] = float("nan")
    n = v.numel()
    for k in (0, 100, n // 2, n - 3000, n - 1, n):
        check_mask(backend, v, k)


VIEWS = [lambda b: b.t(), lambda b: b[:, ::3], lambda b: b[100:600:2, 7:800].t()]


@pytest.mark.parametrize("view_of", VIEWS)
def test_prune_mask_non_contiguous(backend, view_of):
    base = torch.randn(700, 900, generator=gen(5))
    base[::3] = 0.25  # ties
    view, view_d = view_of(base), view_of(backend.put(base))
    assert not view_d.is_contiguous()
    k = view.numel() * 2 // 5
    got = backend.ops.prune_mask(view_d, k)
    assert got.shape == view.shape and got.is_contiguous()
    assert torch.equal(got.cpu(), ref.prune_mask(view, k))
    assert torch.equal(got.cpu(), _ops.prune_mask(view, k))


def test_prune_mask_rejects_bad_arguments(backend):
    v = torch.randn(10)
    with pytest.raises(RuntimeError, match="k must be in"):
        backend.prune_mask(v, 11)
    with pytest.raises(RuntimeError, match="k must be in"):
        backend.prune_mask(v, -1)
    with pytest.raises(RuntimeError, match="float32"):
        backend.prune_mask(v.double(), 3)


def test_prune_mask_empty(backend):
    got = backend.prune_mask(torch.empty(0, 5), 0)
    assert got.shape == (0, 5) and got.device == backend.device


def test_prune_mask_beyond_int32_indexing(gpu):
    n = (1 << 31) + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs ~11 GiB of free GPU memory")
    v = torch.ones(n, device=gpu)
    v[-5:] = 0.5  # the five smallest sit past index 2^31
    got = _ops.prune_mask(v, 3)
    assert int(got.sum()) == 3 and bool(got[-5:-2].all())
    del got
    # All ties but the last five: the cut among the ones falls near the end.
    got = _ops.prune_mask(v, n - 2)
    assert int(got.sum()) == n - 2
    assert bool(got[-5:].all()) and not bool(got[n - 7]) and not bool(got[n - 6]) and bool(got[n - 8])
    del got, v
    torch.cuda.empty_cache()


# ---------------------------------------------------------------- admm_prune


def make_problem(d_out, d_in, seed, tokens=None):
    g = gen(seed)
    x = torch.randn(tokens or 2 * d_in + 8, d_in, generator=g)
    x[:, 0] *= 10  # uneven channel energies, so the normalisation matters
    h = x.T @ x
    h = h.tril() + h.tril(-1).T  # exactly symmetric, as the native ops read the lower triangle
    w = torch.randn(d_out, d_in, generator=g) * 0.05
    return h, w


def run_cpu(h, w, k, structure="unstructured"):
    return _ops.admm_prune(h, w, k, 0.1, 1.0, 20, 15, structure)


def assert_close_pruned(actual, expected, n_flips_allowed, rtol=1e-3):
    """Masks agree up to a few borderline entries (cuBLAS and MKL round differently); kept weights close."""
    a0, e0 = actual == 0, expected == 0
    flips = int((a0 != e0).sum())
    assert flips <= n_flips_allowed, f"{flips} mask differences"
    both = ~a0 & ~e0
    if both.any():
        err = ((actual - expected)[both].norm() / expected[both].norm()).item()
        assert err <= rtol, f"relative difference {err:.3g} of the kept weights"


def assert_matches_cpu(backend, actual, expected, n_flips_allowed, rtol=1e-3):
    """Emulated: the CPU's GEMMs and the CUDA kernels' float ops, so bit for bit; on a GPU, close."""
    if backend.emulated:
        assert torch.equal(actual, expected), "emulated CUDA kernels and CPU kernels differ"
    else:
        assert_close_pruned(actual, expected, n_flips_allowed, rtol)


@pytest.mark.parametrize("shape", [(64, 48), (33, 70), (256, 128), (130, 300), (512, 257)])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.95])
def test_admm_prune_matches_cpu_and_reference(backend, shape, ratio):
    h, w = make_problem(*shape, seed=sum(shape))
    k = int(w.numel() * ratio)
    out, damping, energy = backend.admm_prune(h, w, k)
    assert out.device == backend.device and out.dtype == torch.float32 and out.shape == w.shape
    out = out.cpu()
    assert int((out == 0).sum()) == k
    assert torch.isfinite(out).all()
    out_cpu, damping_cpu, energy_cpu = run_cpu(h, w, k)
    allowed = 2 + w.numel() // 1000
    assert_matches_cpu(backend, out, out_cpu, allowed)
    assert float(damping.sum()) == pytest.approx(float(damping_cpu.sum()), rel=1e-5)
    assert float(energy) == pytest.approx(float(energy_cpu), rel=1e-4)
    expected = ref.admm_prune(backend.put(h), backend.put(w), k).cpu()
    assert_close_pruned(out, expected, allowed)


@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_admm_prune_ties_break_like_cpu(backend, ratio):
    # A diagonal Hessian decouples the entries, so equal |w| stay exactly equal |V| through all
    # iterations on both devices: the masks then depend on the tie-break alone and must agree exactly.
    d_out, d_in = 96, 80
    h = torch.eye(d_in) * 4.0
    w = torch.randint(1, 5, (d_out, d_in), generator=gen(7)).float() * 0.5
    w *= torch.where(torch.rand(d_out, d_in, generator=gen(8)) < 0.5, -1.0, 1.0)
    k = int(w.numel() * ratio)
    out = backend.admm_prune(h, w, k)[0].cpu()
    out_cpu = run_cpu(h, w, k)[0]
    expected = ref.admm_prune(backend.put(h), backend.put(w), k).cpu()
    assert int((out == 0).sum()) == k
    assert torch.equal(out == 0, out_cpu == 0)
    assert torch.equal(out == 0, expected == 0)
    torch.testing.assert_close(out, out_cpu, rtol=1e-5, atol=1e-6)


def test_admm_prune_not_positive_definite_hessian(backend):
    # Not even positive semi-definite: Hn + damping + rho*I has a negative eigenvalue, so the
    # Cholesky fails and must be retried with more damping, with a warning, never a crash.
    d_in, d_out = 40, 24
    h = torch.eye(d_in)
    h[1:, 0] = 0.9
    h[0, 1:] = 0.9
    w = torch.randn(d_out, d_in, generator=gen(9))
    k = int(w.numel() * 0.3)
    with pytest.warns(UserWarning, match="not positive definite"):
        out, damping, _ = backend.admm_prune(h, w, k)
    out = out.cpu()
    assert torch.isfinite(out).all() and int((out == 0).sum()) == k
    assert float(damping.sum()) > 0.1  # percdamp * mean(diag Hn) = 0.1, plus the retry's extra
    with pytest.warns(UserWarning, match="not positive definite"):
        out_cpu, damping_cpu, _ = run_cpu(h, w, k)
    assert float(damping.sum()) == pytest.approx(float(damping_cpu.sum()), rel=1e-5)
    assert_matches_cpu(backend, out, out_cpu, 4, rtol=1e-2)


def test_admm_prune_pruned_zeros_stay_pruned(backend):
    # Exact zeros are the smallest |V| when the mask is chosen (once here); in the fixed-mask iterations
    # after it the coupled Hessian makes their V non-zero, and only the sign bit of their dual (-0.0)
    # still marks them as pruned.
    h, w = make_problem(48, 64, seed=30)
    w[:, ::3] = 0.0
    w[5::7, 1] = -0.0
    k = int((w == 0).sum())
    out = backend.admm_prune(h, w, k, iters=4, prune_iters=1)[0].cpu()
    assert torch.equal(out == 0, w == 0)
    assert_matches_cpu(backend, out, _ops.admm_prune(h, w, k, 0.1, 1.0, 4, 1)[0], 0)


def test_damped_cholesky_inverse_not_positive_definite(gpu):
    m = torch.eye(30, device=gpu)
    m[0, 0] = -5.0
    with pytest.warns(UserWarning, match="not positive definite"):
        inv, shift = _ops.damped_cholesky_inverse(m, 1.0)
    assert inv.device.type == "cuda" and shift.item() > 6.0
    eye = torch.eye(30, device=gpu)
    torch.testing.assert_close(inv @ (m + shift * eye), eye, rtol=0, atol=1e-4)


def test_admm_prune_non_contiguous_inputs(backend):
    h, w = make_problem(80, 120, seed=11)
    k = int(w.numel() * 0.4)
    out = backend.admm_prune(h, w, k)[0].cpu()
    # Transposed storage for both (H is symmetric, so H^T has the same lower triangle).
    h_d, w_d = backend.put(h), backend.put(w)
    h_t, w_t = h_d.t().contiguous().t(), w_d.t().contiguous().t()
    w_s = torch.zeros(80, 240, device=backend.device)
    w_s[:, ::2] = w_d
    for hh, ww in ((h_t, w_t), (h_d, w_s[:, ::2])):
        assert not ww.is_contiguous()
        got = backend.admm_prune(hh, ww, k)[0].cpu()
        assert_matches_cpu(backend, got, out, 2, rtol=1e-4)
        assert int((got == 0).sum()) == k


def test_non_default_stream(gpu):
    # The producer of the inputs runs on a side stream behind a ~sleep; if any of our kernels ran on
    # the default stream instead, they would read the inputs before they are written.
    v = torch.randn(3000, 1000, generator=gen(12))
    h, w = make_problem(200, 150, seed=13)
    k_mask, k_w = v.numel() // 3, int(w.numel() * 0.5)
    mask_expected = ref.prune_mask(v, k_mask)
    out_expected, _, _ = _ops.admm_prune(h.to(gpu), w.to(gpu), k_w, 0.1, 1.0, 20, 15)
    v_d, h_d, w_d = v.to(gpu), h.to(gpu), w.to(gpu)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        vs = torch.full_like(v_d, 7.0)
        hs = torch.zeros_like(h_d)
        ws = torch.zeros_like(w_d)
        torch.cuda._sleep(100_000_000)
        vs.copy_(v_d)
        hs.copy_(h_d)
        ws.copy_(w_d)
        mask = _ops.prune_mask(vs, k_mask)
        out, _, _ = _ops.admm_prune(hs, ws, k_w, 0.1, 1.0, 20, 15)
        mask_c, out_c = mask.cpu(), out.cpu()  # a copy on the side stream, synchronised with the host
    side.synchronize()
    assert torch.equal(mask_c, mask_expected)
    assert_close_pruned(out_c, out_expected.cpu(), 2, rtol=1e-4)


# ---------------------------------------------------------------- opcheck


def test_opcheck_cuda(gpu):
    h, w = make_problem(40, 48, seed=14)
    h_d, w_d = h.to(gpu), w.to(gpu)
    x = torch.randn(3, 10, 48, device=gpu)
    torch.library.opcheck(torch.ops.admm_sparse.accumulate_sums.default,
                          (torch.zeros(48, 48, dtype=torch.float64, device=gpu),
                           torch.zeros(48, dtype=torch.float64, device=gpu), x))
    torch.library.opcheck(torch.ops.admm_sparse.damped_cholesky_inverse.default, (h_d, 1.0))
    torch.library.opcheck(torch.ops.admm_sparse.prune_mask.default, (torch.randn(33, 17, device=gpu), 200))
    torch.library.opcheck(torch.ops.admm_sparse.prune_mask.default, (tied_values((5, 300), 15).to(gpu), 0))
    torch.library.opcheck(torch.ops.admm_sparse.admm_prune.default, (h_d, w_d, int(w.numel() * 0.3), 0.1, 1.0, 6, 4))


# ---------------------------------------------------------------- mask structures (per_row, N:M)


@pytest.mark.parametrize("shape", [(1, 1), (7, 255), (33, 257), (64, 4096), (5, 70001), (300, 1024)])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_prune_mask_rows_matches_cpu_and_reference(backend, shape, kind):
    v = torch.randn(shape, generator=gen(20)) if kind == "randn" else tied_values(shape, 20)
    for k in sorted({0, 1, shape[1] // 3, shape[1] - 1, shape[1]}):
        got = backend.prune_mask_rows(v, k).cpu()
        assert torch.equal(got, _ops.prune_mask_rows(v, k)), k
        assert torch.equal(got, ref.prune_mask_rows(v, k)), k


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4), (0, 4), (16, 32), (5, 64), (1, 1)])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_prune_mask_nm_matches_cpu_and_reference(backend, nm, kind):
    n, m = nm
    shape = (37, 64 * 5)
    v = torch.randn(shape, generator=gen(21)) if kind == "randn" else tied_values(shape, 21)
    got = backend.prune_mask_nm(v, n, m).cpu()
    assert torch.equal(got, _ops.prune_mask_nm(v, n, m))
    assert torch.equal(got, ref.prune_mask_nm(v, n, m))


@pytest.mark.parametrize("structure", ["per_row", "2:4", "4:8"])
@pytest.mark.parametrize("shape", [(64, 48), (256, 128), (130, 296)])
def test_structured_admm_prune_matches_cpu(backend, structure, shape):
    h, w = make_problem(*shape, seed=sum(shape) + 1)
    d_out, d_in = shape
    if structure == "per_row":
        k = d_out * int(d_in * 0.5)
    else:
        n, m = map(int, structure.split(":"))
        k = d_out * (d_in // m) * (m - n)
    out = backend.admm_prune(h, w, k, structure=structure)[0].cpu()
    out_cpu = run_cpu(h, w, k, structure)[0]
    assert int((out == 0).sum()) >= k
    assert_matches_cpu(backend, out, out_cpu, 2 + w.numel() // 1000)


def test_structured_admm_ties_break_like_cpu(backend):
    d_out, d_in = 96, 80
    h = torch.eye(d_in) * 4.0
    w = torch.randint(1, 5, (d_out, d_in), generator=gen(22)).float() * 0.5
    for structure, k in (("per_row", d_out * 30), ("2:4", d_out * d_in // 2)):
        out = backend.admm_prune(h, w, k, structure=structure)[0].cpu()
        out_cpu = run_cpu(h, w, k, structure)[0]
        assert torch.equal(out == 0, out_cpu == 0)


def test_opcheck_cuda_structured(gpu):
    h, w = make_problem(40, 48, seed=23)
    torch.library.opcheck(torch.ops.admm_sparse.prune_mask_rows.default, (torch.randn(33, 17, device=gpu), 5))
    torch.library.opcheck(torch.ops.admm_sparse.prune_mask_nm.default, (torch.randn(33, 16, device=gpu), 2, 4))
    torch.library.opcheck(torch.ops.admm_sparse.admm_prune.default,
                          (h.to(gpu), w.to(gpu), 40 * 24, 0.1, 1.0, 6, 4, "2:4"))


# ---------------------------------------------------------------- random inputs


@given(n=st.integers(1, 6000), k_frac=st.floats(0, 1), levels=st.sampled_from([0, 1, 3, 50]),
       seed=st.integers(0, 2**16))
def test_prune_mask_random_inputs(backend, n, k_frac, levels, seed):
    v = torch.randn(n, generator=gen(seed)) if levels == 0 else tied_values((n,), seed, levels)
    check_mask(backend, v, int(n * k_frac))


@given(d_out=st.integers(1, 40), d_in=st.integers(1, 40), ratio=st.floats(0, 1),
       structure=st.sampled_from(["unstructured", "per_row", "2:4"]), seed=st.integers(0, 2**16))
def test_admm_prune_random_layers(backend, d_out, d_in, ratio, structure, seed):
    if structure == "2:4":
        d_in = 4 * (d_in // 4 + 1)
        k = d_out * d_in // 2
    elif structure == "per_row":
        k = d_out * int(d_in * ratio)
    else:
        k = int(d_out * d_in * ratio)
    h, w = make_problem(d_out, d_in, seed, tokens=d_in + 3)
    out = backend.admm_prune(h, w, k, structure=structure)[0].cpu()
    out_cpu = run_cpu(h, w, k, structure)[0]
    assert int((out == 0).sum()) >= k
    assert_matches_cpu(backend, out, out_cpu, 2 + w.numel() // 100)


def test_allow_tf32_option(gpu):
    """Default: exact float32 GEMMs even where the caller turned TF32 on; opted in: TF32, a close result."""
    import admm_sparse
    from torch import nn

    x = torch.randn(2048, 512, generator=gen(7)).to(gpu)
    w = torch.randn(256, 512, generator=gen(8))

    def prune(allow_tf32, global_tf32):
        torch.backends.cuda.matmul.allow_tf32 = global_tf32
        try:
            layer = nn.Linear(512, 256, bias=False).to(gpu)
            layer.weight.data.copy_(w)
            report = admm_sparse.prune_linear(layer, x, 0.5, keep_bits=None, allow_tf32=allow_tf32)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
        return layer.weight.detach().cpu(), report

    exact, exact_report = prune(False, False)
    same, _ = prune(False, True)
    torch.testing.assert_close(same, exact, rtol=1e-6, atol=1e-7)  # the global flag changed nothing
    fast, fast_report = prune(True, False)
    assert not torch.equal(fast, exact), "allow_tf32=True should change the GEMMs' rounding"
    assert abs(fast_report.relative_error - exact_report.relative_error) < 0.05 * exact_report.relative_error
