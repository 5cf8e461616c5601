"""The CPU emulator of tests/cuda_emulator, which runs csrc/cuda's kernels in test_cuda.py where no GPU is.

First that it catches what it is there to catch (a missing barrier, divergent barriers and warp
collectives, launch configurations a GPU refuses, shared memory read before it is written) and emulates
warp collectives as CUDA defines them; then csrc/cuda's kernels under other grid sizes (the multiprocessor
count sizes the select's grid) and other thread and block orders than test_cuda.py's default; then all
the emulated CUDA tests again under AddressSanitizer (out-of-bounds accesses), and some with the fallback
fiber switch; and the source rewrites the build relies on.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cuda_emulator import build as emulator
from test_cuda import tied_values

from admm_sparse import _ops
from admm_sparse import reference as ref


@pytest.fixture(scope="module")
def ops():
    ops = emulator.load()
    yield ops
    ops.emulator_configure(4, 0)  # the defaults, which test_cuda.py runs under


def rotated(x):
    return x.view(-1, 256).roll(-32, 1).flatten()


@pytest.mark.parametrize("schedule", [0, 1, 99])
def test_barrier_orders_shared_memory(ops, schedule):
    ops.emulator_configure(4, schedule)
    x = torch.randn(4 * 256)
    assert torch.equal(ops.emulator_selftest("rotate", x), rotated(x))
    # Without the barrier, a warp reads another warp's shared slots before they are written.
    assert not torch.equal(ops.emulator_selftest("rotate_unsynchronised", x), rotated(x))


def test_warp_collectives_follow_cuda(ops):
    ops.emulator_configure(4, 5)
    x = torch.randn(2 * 256)
    out = ops.emulator_selftest("warp_scan", x)
    warps = x.view(-1, 32)
    torch.testing.assert_close(out[: x.numel()], warps.cumsum(1).flatten(), rtol=1e-5, atol=1e-5)
    positives_below = (warps > 0).int().cumsum(1) - (warps > 0).int()
    assert torch.equal(out[x.numel():], positives_below.flatten().float())


def test_shared_memory_starts_as_garbage(ops):
    # As on a GPU: a kernel that reads shared memory before writing it gets garbage (0xff bytes: NaN).
    ops.emulator_configure(4, 0)
    x = torch.randn(256)
    ops.emulator_selftest("rotate", x)  # leaves real values in shared memory
    assert torch.isnan(ops.emulator_selftest("unwritten_shared", x)).all()


@pytest.mark.parametrize("kernel, message", [
    ("divergent_barrier", "__syncthreads reached by 100 threads while 156 of the block have exited"),
    ("divergent_ballot", "a full-mask warp collective reached by 16 of its 32 lanes"),
    ("empty_grid", "invalid configuration argument"),
    ("oversized_block", "invalid configuration argument"),
    ("over_launch_bounds", "too many resources requested for launch"),
])
def test_undefined_behaviour_is_an_error(ops, kernel, message):
    ops.emulator_configure(4, 0)
    with pytest.raises(RuntimeError, match=message):
        ops.emulator_selftest(kernel, torch.randn(256))
    # The failed launch leaves nothing behind: the next one runs normally.
    x = torch.randn(256)
    assert torch.equal(ops.emulator_selftest("rotate", x), rotated(x))


@pytest.mark.parametrize("multiprocessors", [1, 3, 132])  # 132: an H100's or H200's
@pytest.mark.parametrize("schedule", [1, 2026])
def test_cuda_kernels_under_other_grids_and_orders(ops, multiprocessors, schedule):
    ops.emulator_configure(multiprocessors, schedule)
    g = torch.Generator().manual_seed(multiprocessors + schedule)
    for v in (torch.randn(300_001, generator=g), tied_values((1100, 300), schedule, levels=3)):
        n = v.numel()
        for k in (1, n // 3, n - 1):
            assert torch.equal(ops.prune_mask(v, k), ref.prune_mask(v, k)), (v.shape, k)
    v = tied_values((70, 1100), schedule + 1, levels=3)
    assert torch.equal(ops.prune_mask_rows(v, 400), ref.prune_mask_rows(v, 400))
    assert torch.equal(ops.prune_mask_nm(v[:, :1096], 2, 8), ref.prune_mask_nm(v[:, :1096], 2, 8))
    x = torch.randn(200, 96, generator=g)
    h, w = x.T @ x, torch.randn(72, 96, generator=g)
    for structure, k in (("unstructured", 72 * 40), ("per_row", 72 * 40), ("2:4", 72 * 48)):
        out, _, _ = ops.admm_prune(h, w, k, 0.1, 1.0, 20, 15, structure)
        expected, _, _ = _ops.admm_prune(h, w, k, 0.1, 1.0, 20, 15, structure)
        assert torch.equal(out, expected), structure


def test_select_with_more_blocks_than_scan_threads(ops):
    # 132 multiprocessors (an H100's or H200's) and n = 1056 * 2048 give the select 1056 blocks, more
    # than the tie scan's 1024 threads, so some of them count the ties of two blocks (as for a 4096 x 4096
    # layer on those cards). Ties in every block; cuts in an early, a middle and the last blocks.
    ops.emulator_configure(132, 0)
    v = torch.randn(1056 * 2048, generator=torch.Generator().manual_seed(31))
    v[::97] = 0.5 * torch.sign(v[::97])
    below, ties = int((v.abs() < 0.5).sum()), int((v.abs() == 0.5).sum())
    for k in (below + 3, below + ties // 2, below + ties - 2):
        assert torch.equal(ops.prune_mask(v, k), ref.prune_mask(v, k)), k


def variant_environment(**variables):
    """The environment of a process that runs one of build.py's variant builds (one per process)."""
    if os.environ.get(emulator.SANITIZE_ENV) or os.environ.get(emulator.FIBERS_ENV):
        pytest.skip("this process is itself a variant's run")
    return dict(os.environ, **variables)


def sanitized_environment():
    """... for the AddressSanitizer build."""
    # libstdc++ too: preloaded alone into python, libasan cannot forward C++ throws (TORCH_CHECK's errors).
    libs = [subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
            for name in ("libasan.so", "libstdc++.so")]
    if not all(os.path.isabs(lib) for lib in libs):
        pytest.skip("gcc's AddressSanitizer runtime is not installed")
    return variant_environment(LD_PRELOAD=" ".join(libs), ASAN_OPTIONS="detect_leaks=0",
                               **{emulator.SANITIZE_ENV: "address"})


def run_tests(env, *test_files, select=None):
    files = [str(Path(__file__).parent / name) for name in test_files]
    options = ["-k", select] if select else []
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options, *files], env=env,
                          cwd=emulator.REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def test_address_sanitizer_catches_a_read_past_the_end():
    code = ("import torch; from cuda_emulator import build; "
            "build.load().emulator_selftest('read_past_end', torch.randn(256))")
    proc = subprocess.run([sys.executable, "-c", code], env=sanitized_environment(), cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0 and "heap-buffer-overflow" in proc.stderr, proc.stderr[-3000:]
    assert "read_past_end_kernel" in proc.stderr


def test_cuda_kernels_under_address_sanitizer():
    # Every emulated CUDA test again, in a process where any read or write outside a tensor, a stack or a
    # shared array stops the run (on a GPU: an illegal memory access, or silently wrong data).
    run_tests(sanitized_environment(), "test_cuda.py", "test_cuda_emulator.py")


def test_ucontext_fibers():
    # The fallback stack switch, which hosts other than x86-64 (an ARM GPU server, say) run: the tests of
    # the emulator's own semantics (barriers, warp collectives, errors, shared memory) with it, and the
    # CUDA kernels on a few inputs. Its switches cost ~7x the assembly ones, so not the large-input tests.
    run_tests(variant_environment(**{emulator.FIBERS_ENV: "ucontext"}), "test_cuda_emulator.py", "test_cuda.py",
              select="(emulator.py and not grids and not more_blocks) or (emulated and ties_break)")


def test_source_rewrites():
    source = """  radix_hist_kernel<1><<<g, kThreads, 0, stream>>>(load, n, f(a, (b)), ws);
  other<<<dim3(x, y), dim3(32, 8)>>>(p,
      static_cast<int>(q));"""
    bounds = emulator.launch_bounds(["template <int kLevel, class Load>\n__global__ void __launch_bounds__(kThreads)\n"
                                     "    radix_hist_kernel(Load load) {}"])
    assert bounds == {"radix_hist_kernel": "kThreads"}
    assert emulator.rewrite_launches(source, "example", bounds) == (
        '  ::cuda_emulator::launch("radix_hist_kernel<1>", {kThreads}, [&] { radix_hist_kernel<1>(load, n, f(a, (b)), '
        'ws); }, g, kThreads, 0, stream);\n'
        '  ::cuda_emulator::launch("other", {0}, [&] { other(p,\n      static_cast<int>(q)); }, dim3(x, y), '
        'dim3(32, 8));')
    with pytest.raises(RuntimeError, match="does not understand"):
        emulator.rewrite_launches("(*table[i])<<<1, 32>>>(x);", "example", {})
    assert emulator.rewrite_shared("  __shared__ long long sums[kBlock / 32];", "example") == (
        "  long long (&sums)[kBlock / 32] = ::cuda_emulator::shared_array<long long[kBlock / 32], __COUNTER__>();")
    with pytest.raises(RuntimeError, match="__shared__ declaration"):
        emulator.rewrite_shared("__shared__ float total;", "example")
    assert emulator.rewrite_registrations("TORCH_LIBRARY_IMPL(admm_sparse, CUDA, m) {}", "example") == (
        "TORCH_LIBRARY_IMPL(admm_sparse_emulated, CPU, m) {}")
    assert emulator.rewrite_registrations("TORCH_LIBRARY(admm_sparse, m) {}", "example") == (
        "TORCH_LIBRARY(admm_sparse_emulated, m) {}")
    for unknown in ("TORCH_LIBRARY_IMPL(admm_sparse,CUDA, m) {}", "TORCH_LIBRARY_IMPL( admm_sparse, CPU, m) {}"):
        with pytest.raises(RuntimeError, match="op registration"):
            emulator.rewrite_registrations(unknown, "example")
