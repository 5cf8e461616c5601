"""Sparsity allocation by measured error (admm_sparse.allocation): which objective spreads the zeros best?

Prunes the built-in model at one global ratio in fast mode, once per allocation, and measures the held-out
perplexity: uniform (every layer the same ratio), and allocation="error" with the layers' squared relative errors
weighted by their size (the library's objective), unweighted, or by each layer's output energy per token. Every
run prunes exactly the same number of weights. A smaller protocol than BENCHMARKS.md's (fewer, shorter
calibration windows, fewer held-out windows) so that the four runs take minutes.

    python benchmarks/bench_allocation.py                       # 0.7, 32 x 256 calibration, 40 x 512 held out
    python benchmarks/bench_allocation.py --ratio 0.5 --threads 2
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from admm_sparse import allocation  # noqa: E402
from admm_sparse.builtin import load_builtin  # noqa: E402
from admm_sparse.config import FloatSparseConfig  # noqa: E402
from admm_sparse.evaluate import perplexity  # noqa: E402
from admm_sparse.pipeline import prune_blocks  # noqa: E402

OBJECTIVES = {
    "size": None,  # the library's: numel · error²
    "unweighted": lambda shapes, rows: dict.fromkeys(shapes, 1.0),
    "output energy": lambda shapes, rows: {r["name"]: r["output_energy"] for r in rows if "errors" in r},
}


def with_objective(library, weigh):
    """The library's allocated_ratios with another weighting of the layers' squared errors."""
    def ratios(shapes, rows, grid, sparse_ratio):
        return library(shapes, rows, grid, sparse_ratio, weigh(shapes, rows) if weigh else None)
    return ratios


def block_ratios(shapes, ratios, blocks):
    size = {i: sum(s[0] * s[1] for n, s in shapes.items() if f".{i}." in n) for i in range(blocks)}
    return [round(sum(ratios[n] * s[0] * s[1] for n, s in shapes.items() if f".{i}." in n) / size[i], 3)
            for i in range(blocks)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.7)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_builtin(num_calib=args.calib_windows, seq_len=args.calib_seq_len)
    library = allocation.allocated_ratios
    results = []
    for name, weigh in [("uniform", None)] + list(OBJECTIVES.items()):
        model = copy.deepcopy(data.model)
        allocation.allocated_ratios = with_objective(library, weigh)
        config = FloatSparseConfig(args.ratio, keep_bits=None, mode="fast",
                                   allocation="uniform" if name == "uniform" else "error")
        start = time.perf_counter()
        try:
            result = prune_blocks(model, data.calib, config, progress=False)
        finally:
            allocation.allocated_ratios = library
        seconds = time.perf_counter() - start
        ppl = perplexity(model, data.heldout, seq_len=512, num_windows=args.eval_windows, progress=False)
        shapes = {r["name"]: tuple(r["shape"]) for r in result.rows}
        row = dict(objective=name, perplexity=round(ppl, 2), prune_seconds=round(seconds, 1),
                   block_ratios=block_ratios(shapes, result.ratios, len(data.model.model.layers)))
        print(json.dumps(row), flush=True)
        results.append(row)
    print(f"\n{args.ratio:g} sparsity, fast mode, {args.calib_windows} x {args.calib_seq_len} calibration windows, "
          f"{args.eval_windows} x 512 held-out windows, {args.threads} thread(s)\n")
    print("| allocation | perplexity | prune s |\n|---|---|---|")
    for r in results:
        print(f"| {r['objective']} | {r['perplexity']:.2f} | {r['prune_seconds']:.0f} |")
    return results


if __name__ == "__main__":
    main()
