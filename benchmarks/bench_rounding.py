"""Layer error of keep-bit rounding: post hoc (SPEC §3) against rounding inside the solver (round_in_admm),
in seed and quality mode, on a synthetic layer with correlated inputs (the shape of tests/test_quality.py).

    python benchmarks/bench_rounding.py --size 1024 --ratio 0.3

Prints a markdown table: relative output error ||X (W - W0)ᵀ|| / ||X W0ᵀ|| and seconds for each setting,
and the share of the post-hoc rounding's squared error cost that rounding inside the solver saves.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import admm_sparse  # noqa: E402

SETTINGS = [("seed", "off", dict(keep_bits=None)), ("seed", "post hoc", {}),
            ("seed", "in solver", dict(round_in_admm=True)), ("quality", "off", dict(mode="quality", keep_bits=None)),
            ("quality", "post hoc", dict(mode="quality", round_in_admm=False)),
            ("quality", "in solver", dict(mode="quality"))]


def correlated_inputs(tokens: int, d_in: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g)
    x = x @ (torch.randn(d_in, d_in, generator=g) * 2 / math.sqrt(d_in) + torch.eye(d_in))
    return x * torch.exp(torch.randn(d_in, generator=g) * 0.7)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="square layer size (default 1024)")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--tokens", type=int, help="calibration tokens (default 4 x size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = correlated_inputs(args.tokens or 4 * args.size, args.size, args.seed)
    errors = {}
    lines = [f"{args.size}x{args.size} layer, ratio {args.ratio}, {x.shape[0]} correlated tokens (seed {args.seed}), "
             f"keep_bits 2, keep_proportion 0.02, {args.threads} thread(s), torch {torch.__version__}", "",
             "| mode | keep-bit rounding | relative output error | seconds |", "|---|---|---|---|"]
    for mode, rounding, options in SETTINGS:
        torch.manual_seed(args.seed)
        layer = nn.Linear(args.size, args.size)
        start = time.perf_counter()
        report = admm_sparse.prune_linear(layer, x, args.ratio, **options)
        errors[mode, rounding] = report.relative_error
        lines.append(f"| {mode} | {rounding} | {report.relative_error:.4f} | {time.perf_counter() - start:.1f} |")
    lines.append("")
    for mode in ("seed", "quality"):
        base, post, inside = (errors[mode, r] ** 2 for r in ("off", "post hoc", "in solver"))
        lines.append(f"{mode} mode: rounding in the solver saves {100 * (1 - (inside - base) / (post - base)):.0f}% of "
                     "the post-hoc rounding's squared error cost.")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
