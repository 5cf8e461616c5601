"""Measured per-op times of one LLaMA-2-70B decoder block on this machine's device, for the distributed cost model.

    python benchmarks/bench_op_times.py --device cuda --write

What a block of the block loop does, op by op, at LLaMA-2-70B's shapes (hidden 8192, intermediate 28672, GQA 8 KV
heads of 128) and the cost model's calibration (64 windows of 512 tokens):
- forward: each Linear's GEMM over every calibration token in bfloat16 (the model's dtype on a GPU);
- statistics: accumulate_sums, one call per 512-token window, for each distinct input (qkv, o, gate/up, down);
- admm: the seed-mode ADMM op (20 iterations, the mask re-chosen in the first 15, ratio 0.3) of each Linear, whole;
- admm split over R ranks (8 and 16): one rank's share of admm_sparse.split (the whole d_in inverse, its 1/R of the output
  rows' GEMMs and projections, the radix select's sweeps), with every collective replaced by the same data from
  R identical ranks (so the counts and sums are what R ranks would give; the transport itself is left to the cost
  model's latency term).
Each time is the median of --repeats runs after one warm-up, synchronised. --write stores them in
benchmarks/results/op_times.json, which benchmarks/bench_distributed.py reads for its LLaMA-2-70B prediction.
`--device cpu --scale 64` runs the logic at 1/64 of every dimension (a smoke run; its figures mean nothing).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from admm_sparse import _ops, device as devices  # noqa: E402
from admm_sparse.split import admm_prune_split  # noqa: E402
from benchmarks.bench_cuda import calibration, median_seconds  # noqa: E402

OP_TIMES = ROOT / "benchmarks" / "results" / "op_times.json"
HIDDEN, INTERMEDIATE, KV = 8192, 28672, 1024
# LLaMA-2-70B's Linears (out, in), and which input each reads (one Hessian per input).
LAYERS = {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
          "gate": (INTERMEDIATE, HIDDEN), "up": (INTERMEDIATE, HIDDEN), "down": (HIDDEN, INTERMEDIATE)}
INPUTS = {"qkv": HIDDEN, "o": HIDDEN, "gate/up": HIDDEN, "down": INTERMEDIATE}
WINDOWS, WINDOW_TOKENS = 64, 512
RATIO, ITERS, PRUNE_ITERS, PERCDAMP, RHO = 0.3, 20, 15, 0.1, 1.0


class MirroredGroup:
    """A group of `size` ranks that all hold this rank's data: a sum multiplies by size, a broadcast keeps the
    tensor. One process then does exactly one rank's share of a split layer's work."""

    def __init__(self, size: int):
        self.size, self.rank = size, 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.mul_(self.size)

    def broadcast(self, tensor: torch.Tensor, owner: int) -> None:
        pass


def measure(device: torch.device, scale: int, repeats: int, ranks: list[int]) -> dict:
    dims = {name: (o // scale, i // scale) for name, (o, i) in LAYERS.items()}
    inputs = {name: d // scale for name, d in INPUTS.items()}
    tokens, window = WINDOWS * WINDOW_TOKENS // scale, max(WINDOW_TOKENS // scale, 1)
    out = {"forward": {}, "statistics": {}, "admm": {}, "admm_split": {str(r): {} for r in ranks}}

    for name, (d_out, d_in) in dims.items():
        x = calibration(tokens, d_in, 1, device)[0].bfloat16()
        w = torch.randn(d_out, d_in, device=device, dtype=torch.bfloat16)
        out["forward"][name] = median_seconds(lambda: x @ w.T, repeats, device)
        del x, w
        devices.empty_cache(device)

    hessians = {}
    for name, d_in in inputs.items():
        x = calibration(tokens, d_in, 2, device)[0]
        sums = (torch.zeros(d_in, d_in, dtype=torch.float64, device=device),
                torch.zeros(d_in, dtype=torch.float64, device=device))
        out["statistics"][name] = median_seconds(
            lambda: [_ops.accumulate_sums(*sums, part) for part in x.split(window)], repeats, device)
        del sums
        if d_in not in hessians:
            hessians[d_in] = torch.tril(x.T @ x)  # the ops read the lower triangle
        del x
        devices.empty_cache(device)

    for name, (d_out, d_in) in dims.items():
        h = hessians[d_in]
        w = torch.randn(d_out, d_in, device=device) * d_in ** -0.5
        k = int(w.numel() * RATIO)
        out["admm"][name] = median_seconds(
            lambda: _ops.admm_prune(h, w, k, PERCDAMP, RHO, ITERS, PRUNE_ITERS), repeats, device)
        for r in ranks:
            out["admm_split"][str(r)][name] = median_seconds(
                lambda: admm_prune_split(h, w, k, PERCDAMP, RHO, ITERS, PRUNE_ITERS, "unstructured",
                                         MirroredGroup(r)), repeats, device)
        del w
        devices.empty_cache(device)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="the device to time (default cuda)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per op after a warm-up (default 2)")
    p.add_argument("--ranks", type=lambda t: [int(r) for r in t.split(",")], default=[8, 16],
                   help="ranks a split layer is divided over, comma-separated (default 8,16)")
    p.add_argument("--scale", type=int, default=1, help="divide every dimension by this (a smoke run)")
    p.add_argument("--write", action="store_true", help="store the times in benchmarks/results/op_times.json")
    args = p.parse_args(argv)
    device = devices.resolve(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # SPEC: float32 GEMMs
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    times = measure(device, args.scale, args.repeats, args.ranks)
    result = {"device": name, "torch": torch.__version__, "ranks": args.ranks, "scale": args.scale,
              "windows": WINDOWS, "window_tokens": WINDOW_TOKENS, "ratio": RATIO, "seconds": times}
    print(f"LLaMA-2-70B block op times on {name} (torch {torch.__version__}, TF32 off, median of {args.repeats}):\n")
    print("| op | " + " | ".join(LAYERS) + " |")
    print("|---|" + "---:|" * len(LAYERS))
    rows = [("forward", times["forward"]), ("admm", times["admm"])] + \
        [(f"admm, 1/{r} of the rows", t) for r, t in times["admm_split"].items()]
    for label, row in rows:
        print(f"| {label} s | " + " | ".join(f"{row[n]:.3f}" for n in LAYERS) + " |")
    print("\nstatistics s: " + ", ".join(f"{n} {t:.3f}" for n, t in times["statistics"].items()))
    if args.write:
        OP_TIMES.parent.mkdir(exist_ok=True)
        tmp = OP_TIMES.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(OP_TIMES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
