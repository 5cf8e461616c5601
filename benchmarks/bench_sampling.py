"""Sampling windows for distillation (admm_sparse.distill.sample_windows) with a static key-value cache against the
model's own dynamic one, on the built-in model, in one process, alternating.

    python benchmarks/bench_sampling.py                       # 64 windows of 512 tokens (one chunk), 2 threads
    python benchmarks/bench_sampling.py --windows 16 --repeats 3
    python benchmarks/bench_sampling.py --write               # and store the table in benchmarks/RESULTS.md
    python benchmarks/bench_sampling.py --windows 4 --autocast none   # float32: the two caches' windows alike?

The windows continue the protocol's calibration windows (BENCHMARKS.md: the built-in model in float32, bfloat16
autocast as the `best` preset's calibration_dtype runs), as quality.py's distillation runs do. The dynamic cache
concatenates each layer's keys and values at every step; the static one writes them in place and reads the whole
window's length. Also printed: the share of sampled tokens the two give alike (the same seeded generator: they
part only where bfloat16 rounding in the attention moves a draw across a boundary, and a window's later tokens
follow it).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from admm_sparse import distill  # noqa: E402
from admm_sparse.builtin import load_builtin  # noqa: E402
from benchmarks.results_md import RESULTS_MD, write_section  # noqa: E402

BEGIN, END = "<!-- bench_sampling:begin -->", "<!-- bench_sampling:end -->"


def sample(model, batches, windows: int, static: bool, autocast: bool) -> tuple[torch.Tensor, float]:
    """The windows sample_windows gives and its seconds, with its static cache or (static False) none of ours, in
    bfloat16 autocast or (autocast False) the model's float32."""
    real = distill._static_cache
    distill._static_cache = real if static else (lambda model, length: None)
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    try:
        got, seconds = distill.sample_windows(model, batches, windows, torch.device("cpu"), context)
    finally:
        distill._static_cache = real
    return torch.cat(got), seconds


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=64, help="windows sampled (default 64: one chunk of 512 tokens)")
    p.add_argument("--length", type=int, default=512, help="window length in tokens (default 512, the protocol's)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each cache, alternating (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--autocast", choices=("bfloat16", "none"), default="bfloat16",
                   help="the sampling's autocast (default bfloat16, as the `best` preset's calibration passes)")
    p.add_argument("--write", action="store_true", help="store the table in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_builtin(num_calib=64, seq_len=args.length)
    model = data.model.eval()
    batches = list(data.calib.split(1))
    times = {"dynamic": [], "static": []}
    tokens = {}
    for _ in range(args.repeats):
        for name in times:
            tokens[name], seconds = sample(model, batches, args.windows, name == "static", args.autocast != "none")
            times[name].append(seconds)
            print(f"{name}: {seconds:.1f} s", flush=True)
    length = data.calib.shape[1]
    per_chunk = max(1, distill.SAMPLE_TOKENS // length)
    steps = (length - distill.PROMPT_TOKENS) * -(-args.windows // per_chunk)  # steps of every chunk
    dynamic, static = (statistics.median(times[n]) for n in ("dynamic", "static"))
    new = slice(distill.PROMPT_TOKENS, None)
    alike = (tokens["dynamic"][:, new] == tokens["static"][:, new]).float().mean().item()
    autocast = " under bfloat16 autocast" if args.autocast != "none" else ""
    lines = [BEGIN, "", f"Command: `{' '.join(['python benchmarks/bench_sampling.py', *(argv or sys.argv[1:])])}`", "",
             f"torch {torch.__version__}, {args.threads} threads, the built-in model in float32{autocast}; "
             f"{args.windows} windows of {length} tokens, up to {per_chunk} at a time ({steps} steps), median of "
             f"{args.repeats} run(s), caches alternating.", "",
             "| cache | seconds | seconds a step | speed-up |", "|---|---|---|---|",
             f"| dynamic (the model's own) | {dynamic:.1f} | {dynamic / steps:.3f} | 1.00x |",
             f"| static (sample_windows) | {static:.1f} | {static / steps:.3f} | {dynamic / static:.2f}x |", "",
             f"Sampled tokens alike in both: {alike:.1%}.", "", END]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(RESULTS_MD, text, BEGIN, END)
    return text


if __name__ == "__main__":
    main()
