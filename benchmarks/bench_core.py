"""Speed and memory of admm_sparse.prune_linear against admm_sparse.reference.prune_linear (the seed's
algorithm in plain PyTorch: explicit inverse, sort-based masks, separate elementwise passes) in the
same process on the same inputs, plus the "GEMM floor": 20 GEMMs of d_in x d_in x d_out and one
inverse, measured on the same machine.

    python benchmarks/bench_core.py                     # 1024, 2048, 4096; prints a markdown table
    python benchmarks/bench_core.py --write             # and stores it in benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
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


def gemm_floor(d_out: int, d_in: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(d_in, d_in, generator=g) / d_in**0.5
    spd = x @ x.T + torch.eye(d_in)
    rhs = torch.randn(d_in, d_out, generator=g)
    out = torch.empty(d_in, d_out)

    def run():
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(spd))
        for _ in range(20):
            torch.mm(hinv, rhs, out=out)

    return median_seconds(run, repeats)


def bench(d_out: int, d_in: int, tokens: int, ratio: float, repeats: int, ref_repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=g)
    layer = nn.Linear(d_in, d_out, bias=False)
    w0 = layer.weight.detach().clone()

    def ours():
        with torch.no_grad():
            layer.weight.copy_(w0)
        admm_sparse.prune_linear(layer, x, ratio)

    def ref():
        reference.prune_linear(w0, [x], ratio)

    ours()  # warm-up (thread pools, allocator)
    t_ours = median_seconds(ours, repeats)
    peak = peak_extra_bytes(ours)
    t_ref = median_seconds(ref, ref_repeats)
    t_floor = gemm_floor(d_out, d_in, repeats)
    budget = 4 * (2 * d_in * d_in + 4 * d_in * d_out)
    return dict(shape=f"{d_out}x{d_in}", ours=t_ours, ref=t_ref, floor=t_floor, peak=peak, budget=budget)


def table(rows: list[dict], args) -> str:
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; {args.tokens} calibration tokens, ratio {args.ratio}, keep-bit rounding on; "
        f"median of {args.repeats} runs (reference: {args.ref_repeats}). Peak memory: resident memory prune_linear "
        "adds (H and the calibration input's statistics included, the input itself not), "
        + ("with glibc mapping every block of 1 MiB or more on its own, so that it follows the live tensors."
           if args.live_memory else "glibc's default heap (may reuse memory freed earlier: a lower bound)."),
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
    args = parser.parse_args()
    args.live_memory = track_live_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        rows.append(bench(size, size, args.tokens, args.ratio, args.repeats, args.ref_repeats))
        print(rows[-1], flush=True)
    text = table(rows, args)
    print(text)
    if args.write:
        import sys
        write_results(text, "python " + " ".join(["benchmarks/bench_core.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
