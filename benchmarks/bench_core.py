"""Speed and memory of admm_sparse.prune_linear against admm_sparse.reference.prune_linear (the seed's
algorithm in plain PyTorch: explicit inverse, sort-based masks, separate elementwise passes) in the
same process on the same inputs, plus the "GEMM floor": 20 GEMMs of d_in x d_in x d_out and one
inverse, measured on the same machine.

    python benchmarks/bench_core.py                     # 1024, 2048, 4096; prints a markdown table
    python benchmarks/bench_core.py --write             # and stores it in benchmarks/RESULTS.md
    python benchmarks/bench_core.py --sizes 4096 --phases   # where the time goes, step by step
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import admm_sparse  # noqa: E402
from admm_sparse import reference  # noqa: E402
from benchmarks.results_md import RESULTS_MD, write_section  # noqa: E402
BEGIN, END = "<!-- core:begin -->", "<!-- core:end -->"


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def track_live_memory() -> bool:
    """Make resident memory follow the live tensors (glibc only): with a fixed mmap threshold every block
    of 1 MiB or more is mapped on allocation and unmapped on free. By default glibc raises the threshold
    as blocks are freed and then serves large blocks from a heap it keeps, so the peak below would depend
    on what ran before (it read 30 MiB one run and 128 MiB another for the same 2048 layer)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return libc.mallopt(-3, 1 << 20) == 1  # M_MMAP_THRESHOLD


def peak_extra_bytes(fn) -> int | None:
    """Peak resident memory that fn adds on top of what is resident when it starts (Linux only):
    /proc/self/clear_refs resets the high-water mark. Meaningful after track_live_memory()."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def gemm_floor(d_out: int, d_in: int):
    """The floor's work as a function to time: one Cholesky inverse and 20 GEMMs of d_in x d_in x d_out."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(d_in, d_in, generator=g) / d_in**0.5
    spd = x @ x.T + torch.eye(d_in)
    rhs = torch.randn(d_in, d_out, generator=g)
    out = torch.empty(d_in, d_out)

    def run():
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(spd))
        for _ in range(20):
            torch.mm(hinv, rhs, out=out)

    return run


def _setup(d_out: int, d_in: int, tokens: int, ratio: float):
    """The layer, its calibration input, and prune_linear on a fresh copy of the weight."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=g)
    layer = nn.Linear(d_in, d_out, bias=False)
    w0 = layer.weight.detach().clone()

    def ours():
        with torch.no_grad():
            layer.weight.copy_(w0)
        admm_sparse.prune_linear(layer, x, ratio)

    return x, w0, ours


def peak_in_subprocess(d_out: int, d_in: int, tokens: int, ratio: float) -> int | None:
    """The peak measured in a fresh process with live-memory tracking: a fixed mmap threshold costs
    page faults on every large allocation, which would slow the timed runs here."""
    cmd = [sys.executable, __file__, "--peak-of", str(d_out), str(d_in), "--tokens", str(tokens), "--ratio", str(ratio),
           "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    return None if not out or out[-1] == "None" else int(out[-1])


def bench(d_out: int, d_in: int, tokens: int, ratio: float, repeats: int, ref_repeats: int) -> dict:
    x, w0, ours = _setup(d_out, d_in, tokens, ratio)
    floor = gemm_floor(d_out, d_in)
    ours()  # warm-up (thread pools, allocator)
    # prune_linear and the floor alternate, so that the machine's drift (~10% over minutes on shared
    # cores) moves both medians alike instead of the ratio.
    t_ours, t_floor = [], []
    for _ in range(repeats):
        t_ours.append(median_seconds(ours, 1))
        t_floor.append(median_seconds(floor, 1))
    t_ours, t_floor = statistics.median(t_ours), statistics.median(t_floor)
    t_ref = median_seconds(lambda: reference.prune_linear(w0, [x], ratio), ref_repeats)
    del x, w0, ours, floor
    peak = peak_in_subprocess(d_out, d_in, tokens, ratio)
    budget = 4 * (2 * d_in * d_in + 4 * d_in * d_out)
    return dict(shape=f"{d_out}x{d_in}", ours=t_ours, ref=t_ref, floor=t_floor, peak=peak, budget=budget)


def table(rows: list[dict], args) -> str:
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; {args.tokens} calibration tokens, ratio {args.ratio}, keep-bit rounding on; "
        f"median of {args.repeats} runs (reference: {args.ref_repeats}), prune_linear and the GEMM floor run "
        "alternately. Peak memory: resident memory prune_linear "
        "adds (H included, the calibration input itself not), measured in a fresh process where glibc maps every "
        "block of 1 MiB or more on its own, so that resident memory follows the live tensors.",
        "",
        "| layer (out x in) | prune_linear s | reference s | speed-up | GEMM floor s | prune_linear / floor "
        "| peak extra memory MiB | budget 2·d_in²+4·d_in·d_out MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = "n/a" if r["peak"] is None else f"{r['peak'] / 2**20:.0f}"
        lines.append(f"| {r['shape']} | {r['ours']:.2f} | {r['ref']:.2f} | {r['ref'] / r['ours']:.2f}x "
                     f"| {r['floor']:.2f} | {r['ours'] / r['floor']:.2f} | {peak} | {r['budget'] / 2**20:.0f} |")
    return "\n".join(lines)


def phases(size: int, tokens: int, ratio: float, repeats: int) -> str:
    """Where prune_linear's time goes at one size: each step timed alone (median), against the floor's parts."""
    from admm_sparse import _ops
    from admm_sparse.keepbits import apply_keepbits
    from admm_sparse.layer import quadratic_trace

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, size, generator=g)
    w0 = torch.randn(size, size, generator=g) / size**0.5
    h_sum, square_sum = torch.zeros(size, size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
    _ops.accumulate_sums(h_sum, square_sum, x)
    h = h_sum.float()
    k = int(size * size * ratio)
    a, out = torch.randn(size, size, generator=g), torch.empty(size, size)
    steps = {
        "statistics (X^T X, lower triangle, float64 sums)": lambda: (h_sum.zero_(), square_sum.zero_(),
                                                                 _ops.accumulate_sums(h_sum, square_sum, x)),
        "admm_prune op (20 iterations)": lambda: _ops.admm_prune(h, w0, k, 0.1, 1.0, 20, 15, "unstructured"),
        "admm_prune op (1 iteration)": lambda: _ops.admm_prune(h, w0, k, 0.1, 1.0, 1, 1, "unstructured"),
        "one GEMM d_in x d_in x d_out": lambda: torch.mm(a, a, out=out),
        "damped Cholesky inverse": lambda: _ops.damped_cholesky_inverse(h, 1.0),
        "k-smallest mask (prune_mask)": lambda: _ops.prune_mask(a, k),
    }
    lines = [f"{size}x{size}, {tokens} tokens, ratio {ratio}, {torch.get_num_threads()} threads, median of {repeats}:",
             "", "| step | seconds |", "|---|---|"]
    timed = {}
    for name, fn in steps.items():
        fn()  # warm-up, and h holds the statistics for the steps after the first
        timed[name] = median_seconds(fn, repeats)
        lines.append(f"| {name} | {timed[name]:.3f} |")
    pruned = _ops.admm_prune(h, w0, k, 0.1, 1.0, 20, 15, "unstructured")[0]
    for name, fn in {"keep-bit rounding (SPEC §3)": lambda: apply_keepbits(pruned, scaler, 2, 0.02),
                     "error report (tr ΔHΔᵀ, half a GEMM)": lambda: quadratic_trace(h, pruned - w0)}.items():
        timed[name] = median_seconds(fn, repeats)
        lines.append(f"| {name} | {timed[name]:.3f} |")
    per_iter = (timed["admm_prune op (20 iterations)"] - timed["admm_prune op (1 iteration)"]) / 19
    gemm = timed["one GEMM d_in x d_in x d_out"]
    lines += ["", f"Per ADMM iteration: {per_iter:.3f} s, of which the GEMM {gemm:.3f} s and the projection pass "
              f"(select, project, dual, right-hand side) {per_iter - gemm:.3f} s."]
    return "\n".join(lines)


def write_results(text: str, command: str) -> None:
    block = f"{BEGIN}\n## CPU: prune_linear vs reference and the GEMM floor\n\nCommand: `{command}`\n\n{text}\n{END}"
    write_section(RESULTS_MD, block, BEGIN, END)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096], help="square layer sizes")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ref-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--write", action="store_true", help="store the table in benchmarks/RESULTS.md")
    parser.add_argument("--phases", action="store_true", help="instead, time prune_linear's steps one by one "
                        "at each size (prints; nothing is written)")
    parser.add_argument("--peak-of", type=int, nargs=2, metavar=("D_OUT", "D_IN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_of:  # the child of peak_in_subprocess
        tracked = track_live_memory()
        ours = _setup(*args.peak_of, args.tokens, args.ratio)[2]
        ours()
        print(peak_extra_bytes(ours) if tracked else None)
        return
    if args.phases:
        for size in args.sizes:
            print(phases(size, args.tokens, args.ratio, args.repeats), flush=True)
        return
    rows = []
    for size in args.sizes:
        rows.append(bench(size, size, args.tokens, args.ratio, args.repeats, args.ref_repeats))
        print(rows[-1], flush=True)
    text = table(rows, args)
    print(text)
    if args.write:
        write_results(text, "python " + " ".join(["benchmarks/bench_core.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
