"""The CUDA kernels (csrc/cuda) against the CPU kernels and admm_sparse.reference.

prune_mask must match bit for bit (same radix select, same tie-break); admm_prune goes through
cuBLAS/cuSOLVER instead of MKL/LAPACK, so it is compared with tolerances, except where the Hessian is
diagonal and the weights tie, which makes the masks exactly comparable.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from admm_sparse import _ops  # noqa: E402
from admm_sparse import reference as ref  # noqa: E402

DEV = torch.device("cuda")


@pytest.fixture(autouse=True, scope="module")
def _setup():
    for op in ("prune_mask", "admm_prune"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"admm_sparse::{op}", "CUDA"):
            pytest.fail(f"admm_sparse::{op} has no CUDA kernel: the extension was built without CUDA; rebuild "
                        "with ADMM_SPARSE_CUDA=1 pip install --no-build-isolation -e .", pytrace=False)
    # Exact float32 GEMMs for the reference comparisons.
    old = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cuda.matmul.allow_tf32 = old[0]
    torch.set_float32_matmul_precision(old[1])


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tied_values(shape, seed, levels=4):
    """Few distinct magnitudes, both signs and both zeros: heavy ties."""
    v = torch.randint(-levels, levels + 1, shape, generator=gen(seed)).float() * 0.25
    v[v == 0] = torch.where(torch.rand(int((v == 0).sum()), generator=gen(seed + 1)) < 0.5, 0.0, -0.0)
    return v


def check_mask(v_cpu, k):
    """CUDA prune_mask == CPU prune_mask == reference, exactly k selected."""
    got = _ops.prune_mask(v_cpu.to(DEV), k)
    assert got.device.type == "cuda" and got.dtype == torch.bool and got.shape == v_cpu.shape
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
def test_prune_mask_matches_cpu_and_reference(shape, kind):
    v = torch.randn(shape, generator=gen(0)) if kind == "randn" else tied_values(shape, 0)
    n = v.numel()
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        check_mask(v, k)


@pytest.mark.parametrize("n", [1000, 70000, 3_000_001])
def test_prune_mask_all_equal_takes_lowest_indices(n):
    # Every entry ties: the selection is the first k flat indices, the cut falling inside some block.
    for fill in (1.5, 0.0, -0.0):
        v = torch.full((n,), fill)
        for k in (1, 255, 257, n // 3, n - 7):
            got = _ops.prune_mask(v.to(DEV), k).cpu()
            expected = torch.zeros(n, dtype=torch.bool)
            expected[:k] = True
            assert torch.equal(got, expected), (fill, k)


def test_prune_mask_ties_in_every_block():
    # The threshold magnitude sits in every block, with random signs; cuts at many places.
    n = 2_000_003
    v = torch.randn(n, generator=gen(3))
    v[::97] = 0.5 * torch.sign(v[::97])
    base = int((v.abs() < 0.5).sum())
    ties = int((v.abs() == 0.5).sum())
    for k in (base + 1, base + ties // 3, base + ties - 1, base + ties):
        check_mask(v, k)


def test_prune_mask_special_values():
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
        check_mask(v, k)


VIEWS = [lambda b: b.t(), lambda b: b[:, ::3], lambda b: b[100:600:2, 7:800].t()]


@pytest.mark.parametrize("view_of", VIEWS)
def test_prune_mask_non_contiguous(view_of):
    base = torch.randn(700, 900, generator=gen(5))
    base[::3] = 0.25  # ties
    view, view_d = view_of(base), view_of(base.to(DEV))
    assert not view_d.is_contiguous()
    k = view.numel() * 2 // 5
    got = _ops.prune_mask(view_d, k)
    assert got.shape == view.shape and got.is_contiguous()
    assert torch.equal(got.cpu(), ref.prune_mask(view, k))
    assert torch.equal(got.cpu(), _ops.prune_mask(view, k))


def test_prune_mask_rejects_bad_arguments():
    v = torch.randn(10, device=DEV)
    with pytest.raises(RuntimeError, match="k must be in"):
        _ops.prune_mask(v, 11)
    with pytest.raises(RuntimeError, match="k must be in"):
        _ops.prune_mask(v, -1)
    with pytest.raises(RuntimeError, match="float32"):
        _ops.prune_mask(v.double(), 3)


def test_prune_mask_empty():
    got = _ops.prune_mask(torch.empty(0, 5, device=DEV), 0)
    assert got.shape == (0, 5) and got.device.type == "cuda"


def test_prune_mask_beyond_int32_indexing():
    n = (1 << 31) + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs ~11 GiB of free GPU memory")
    v = torch.ones(n, device=DEV)
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


def run_native(h, w, k, device, percdamp=0.1, rho=1.0, iters=20, prune_iters=15):
    out, damping, energy = _ops.admm_prune(h.to(device), w.to(device), k, percdamp, rho, iters, prune_iters)
    assert out.device.type == torch.device(device).type and out.dtype == torch.float32 and out.shape == w.shape
    return out.cpu(), float(damping.sum()), float(energy)  # damping: total added to the normalised H


def assert_close_pruned(actual, expected, n_flips_allowed, rtol=1e-3):
    """Masks agree up to a few borderline entries (cuBLAS and MKL round differently); kept weights close."""
    a0, e0 = actual == 0, expected == 0
    flips = int((a0 != e0).sum())
    assert flips <= n_flips_allowed, f"{flips} mask differences"
    both = ~a0 & ~e0
    if both.any():
        err = ((actual - expected)[both].norm() / expected[both].norm()).item()
        assert err <= rtol, f"relative difference {err:.3g} of the kept weights"


@pytest.mark.parametrize("shape", [(64, 48), (33, 70), (256, 128), (130, 300), (512, 257)])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.95])
def test_admm_prune_matches_cpu_and_reference(shape, ratio):
    h, w = make_problem(*shape, seed=sum(shape))
    k = int(w.numel() * ratio)
    out, damping, energy = run_native(h, w, k, DEV)
    assert int((out == 0).sum()) == k
    assert torch.isfinite(out).all()
    out_cpu, damping_cpu, energy_cpu = run_native(h, w, k, "cpu")
    allowed = 2 + w.numel() // 1000
    assert_close_pruned(out, out_cpu, allowed)
    assert damping == pytest.approx(damping_cpu, rel=1e-5)
    assert energy == pytest.approx(energy_cpu, rel=1e-4)
    expected = ref.admm_prune(h.to(DEV), w.to(DEV), k).cpu()
    assert_close_pruned(out, expected, allowed)


@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_admm_prune_ties_break_like_cpu(ratio):
    # A diagonal Hessian decouples the entries, so equal |w| stay exactly equal |V| through all
    # iterations on both devices: the masks then depend on the tie-break alone and must agree exactly.
    d_out, d_in = 96, 80
    h = torch.eye(d_in) * 4.0
    w = torch.randint(1, 5, (d_out, d_in), generator=gen(7)).float() * 0.5
    w *= torch.where(torch.rand(d_out, d_in, generator=gen(8)) < 0.5, -1.0, 1.0)
    k = int(w.numel() * ratio)
    out, _, _ = run_native(h, w, k, DEV)
    out_cpu, _, _ = run_native(h, w, k, "cpu")
    expected = ref.admm_prune(h.to(DEV), w.to(DEV), k).cpu()
    assert int((out == 0).sum()) == k
    assert torch.equal(out == 0, out_cpu == 0)
    assert torch.equal(out == 0, expected == 0)
    torch.testing.assert_close(out, out_cpu, rtol=1e-5, atol=1e-6)


def test_admm_prune_not_positive_definite_hessian():
    # Not even positive semi-definite: Hn + damping + rho*I has a negative eigenvalue, so the
    # Cholesky fails and must be retried with more damping, with a warning, never a crash.
    d_in, d_out = 40, 24
    h = torch.eye(d_in)
    h[1:, 0] = 0.9
    h[0, 1:] = 0.9
    w = torch.randn(d_out, d_in, generator=gen(9))
    k = int(w.numel() * 0.3)
    with pytest.warns(UserWarning, match="not positive definite"):
        out, damping, _ = run_native(h, w, k, DEV)
    assert torch.isfinite(out).all() and int((out == 0).sum()) == k
    assert damping > 0.1  # percdamp * mean(diag Hn) = 0.1, plus the retry's extra
    with pytest.warns(UserWarning, match="not positive definite"):
        out_cpu, damping_cpu, _ = run_native(h, w, k, "cpu")
    assert damping == pytest.approx(damping_cpu, rel=1e-5)
    assert_close_pruned(out, out_cpu, 4, rtol=1e-2)


def test_damped_cholesky_inverse_not_positive_definite():
    m = torch.eye(30, device=DEV)
    m[0, 0] = -5.0
    with pytest.warns(UserWarning, match="not positive definite"):
        inv, shift = _ops.damped_cholesky_inverse(m, 1.0)
    assert inv.device.type == "cuda" and shift.item() > 6.0
    eye = torch.eye(30, device=DEV)
    torch.testing.assert_close(inv @ (m + shift * eye), eye, rtol=0, atol=1e-4)


def test_admm_prune_non_contiguous_inputs():
    h, w = make_problem(80, 120, seed=11)
    k = int(w.numel() * 0.4)
    out, _, _ = run_native(h, w, k, DEV)
    # Transposed storage for both (H is symmetric, so H^T has the same lower triangle).
    h_t = h.to(DEV).t().contiguous().t()
    w_t = w.to(DEV).t().contiguous().t()
    w_s = torch.zeros(80, 240, device=DEV)
    w_s[:, ::2] = w.to(DEV)
    for hh, ww in ((h_t, w_t), (h.to(DEV), w_s[:, ::2])):
        assert not ww.is_contiguous()
        got, _, _ = run_native(hh, ww, k, DEV)
        assert_close_pruned(got, out, 2, rtol=1e-4)
        assert int((got == 0).sum()) == k


def test_non_default_stream():
    # The producer of the inputs runs on a side stream behind a ~sleep; if any of our kernels ran on
    # the default stream instead, they would read the inputs before they are written.
    v = torch.randn(3000, 1000, generator=gen(12))
    h, w = make_problem(200, 150, seed=13)
    k_mask, k_w = v.numel() // 3, int(w.numel() * 0.5)
    mask_expected = ref.prune_mask(v, k_mask)
    out_expected, _, _ = run_native(h, w, k_w, DEV)
    v_d, h_d, w_d = v.to(DEV), h.to(DEV), w.to(DEV)
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
    assert_close_pruned(out_c, out_expected, 2, rtol=1e-4)


# ---------------------------------------------------------------- opcheck


def test_opcheck_cuda():
    h, w = make_problem(40, 48, seed=14)
    h_d, w_d = h.to(DEV), w.to(DEV)
    x = torch.randn(3, 10, 48, device=DEV)
    torch.library.opcheck(torch.ops.admm_sparse.accumulate_stats.default,
                          (torch.zeros(48, 48, device=DEV), torch.zeros(48, device=DEV), x, 0, 3))
    torch.library.opcheck(torch.ops.admm_sparse.damped_cholesky_inverse.default, (h_d, 1.0))
    torch.library.opcheck(torch.ops.admm_sparse.prune_mask.default, (torch.randn(33, 17, device=DEV), 200))
    torch.library.opcheck(torch.ops.admm_sparse.prune_mask.default, (tied_values((5, 300), 15).to(DEV), 0))
    torch.library.opcheck(torch.ops.admm_sparse.admm_prune.default, (h_d, w_d, int(w.numel() * 0.3), 0.1, 1.0, 6, 4))


# ---------------------------------------------------------------- mask structures (per_row, N:M)


@pytest.mark.parametrize("shape", [(1, 1), (7, 255), (33, 257), (64, 4096), (5, 70001), (300, 1024)])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_prune_mask_rows_matches_cpu_and_reference(shape, kind):
    v = torch.randn(shape, generator=gen(20)) if kind == "randn" else tied_values(shape, 20)
    for k in sorted({0, 1, shape[1] // 3, shape[1] - 1, shape[1]}):
        got = _ops.prune_mask_rows(v.to(DEV), k).cpu()
        assert torch.equal(got, _ops.prune_mask_rows(v, k)), k
        assert torch.equal(got, ref.prune_mask_rows(v, k)), k


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4), (0, 4), (16, 32), (5, 64), (1, 1)])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_prune_mask_nm_matches_cpu_and_reference(nm, kind):
    n, m = nm
    shape = (37, 64 * 5)
    v = torch.randn(shape, generator=gen(21)) if kind == "randn" else tied_values(shape, 21)
    got = _ops.prune_mask_nm(v.to(DEV), n, m).cpu()
    assert torch.equal(got, _ops.prune_mask_nm(v, n, m))
    assert torch.equal(got, ref.prune_mask_nm(v, n, m))


@pytest.mark.parametrize("structure", ["per_row", "2:4", "4:8"])
@pytest.mark.parametrize("shape", [(64, 48), (256, 128), (130, 296)])
def test_structured_admm_prune_matches_cpu(structure, shape):
    h, w = make_problem(*shape, seed=sum(shape) + 1)
    d_out, d_in = shape
    if structure == "per_row":
        k = d_out * int(d_in * 0.5)
    else:
        n, m = map(int, structure.split(":"))
        k = d_out * (d_in // m) * (m - n)
    out, _, _ = _ops.admm_prune(h.to(DEV), w.to(DEV), k, 0.1, 1.0, 20, 15, structure)
    out = out.cpu()
    out_cpu, _, _ = _ops.admm_prune(h, w, k, 0.1, 1.0, 20, 15, structure)
    assert int((out == 0).sum()) >= k
    assert_close_pruned(out, out_cpu, 2 + w.numel() // 1000)


def test_structured_admm_ties_break_like_cpu():
    d_out, d_in = 96, 80
    h = torch.eye(d_in) * 4.0
    w = torch.randint(1, 5, (d_out, d_in), generator=gen(22)).float() * 0.5
    for structure, k in (("per_row", d_out * 30), ("2:4", d_out * d_in // 2)):
        out, _, _ = _ops.admm_prune(h.to(DEV), w.to(DEV), k, 0.1, 1.0, 20, 15, structure)
        out_cpu, _, _ = _ops.admm_prune(h, w, k, 0.1, 1.0, 20, 15, structure)
        assert torch.equal(out.cpu() == 0, out_cpu == 0)


def test_opcheck_cuda_structured():
    h, w = make_problem(40, 48, seed=23)
    torch.library.opcheck(torch.ops.admm_sparse.prune_mask_rows.default, (torch.randn(33, 17, device=DEV), 5))
    torch.library.opcheck(torch.ops.admm_sparse.prune_mask_nm.default, (torch.randn(33, 16, device=DEV), 2, 4))
    torch.library.opcheck(torch.ops.admm_sparse.admm_prune.default,
                          (h.to(DEV), w.to(DEV), 40 * 24, 0.1, 1.0, 6, 4, "2:4"))


def test_allow_tf32_option():
    """Default: exact float32 GEMMs even where the caller turned TF32 on; opted in: TF32, a close result."""
    import admm_sparse
    from torch import nn

    x = torch.randn(2048, 512, generator=gen(7)).to(DEV)
    w = torch.randn(256, 512, generator=gen(8))

    def prune(allow_tf32, global_tf32):
        torch.backends.cuda.matmul.allow_tf32 = global_tf32
        try:
            layer = nn.Linear(512, 256, bias=False).to(DEV)
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
