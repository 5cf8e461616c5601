"""Rarely routed experts: which statistics to prune them with, measured on held-out tokens.

    python benchmarks/bench_moe_prior.py --write

A synthetic MoE block (SiLU-gated experts, top-2 router with a skew that starves some experts of
calibration tokens; inputs correlated like bench_rounding's). An expert that saw n calibration tokens, fewer
than its d_in inputs, has a singular Hessian: the damping alone decides its solve, and with n = 0 it cannot be
pruned at all. Three treatments, each matrix pruned to the ratio with the ADMM (keep-bit rounding off, so
only the statistics differ):
- routed: the expert's routed tokens only (an expert with none is left dense);
- pooled: routed tokens plus, weighted to make up d_in tokens, the pool of every expert's routed inputs of
  that matrix (for gate/up that is every token; for down, other experts' intermediate activations);
- all tokens (admm_sparse's choice): routed tokens plus, weighted likewise, ALL the block's tokens passed
  through this expert (for gate/up the same as pooled; for down, this expert's own activations).
The error is ||X (W' - W)ᵀ|| / ||X Wᵀ|| on held-out tokens routed to that expert (20x the calibration set).
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import admm_sparse  # noqa: E402
from benchmarks.bench_rounding import correlated_inputs  # noqa: E402
from benchmarks.results_md import RESULTS_MD, write_section  # noqa: E402

BEGIN, END = "<!-- moe-prior:begin -->", "<!-- moe-prior:end -->"
TREATMENTS = ("routed", "pooled", "all tokens")


def make_block(hidden: int, inter: int, experts: int, seed: int, skew: float):
    g = torch.Generator().manual_seed(seed)
    return dict(router=torch.randn(hidden, experts, generator=g) / math.sqrt(hidden),
                skew=torch.linspace(0.0, -skew, experts),  # later experts are chosen less and less often
                gate=torch.randn(experts, inter, hidden, generator=g) / math.sqrt(hidden),
                up=torch.randn(experts, inter, hidden, generator=g) / math.sqrt(hidden),
                down=torch.randn(experts, hidden, inter, generator=g) / math.sqrt(inter))


def route(block, x: torch.Tensor, top_k: int = 2) -> torch.Tensor:
    return (x @ block["router"] + block["skew"]).topk(top_k, dim=-1).indices


def down_input(block, e: int, x: torch.Tensor) -> torch.Tensor:
    return F.silu(x @ block["gate"][e].T) * (x @ block["up"][e].T)


def prune(weight: torch.Tensor, parts: list[torch.Tensor], ratio: float) -> torch.Tensor | None:
    """The weight pruned with the statistics of `parts` (rows of inputs; a part pre-scaled by sqrt(w) counts
    with weight w), or None without any input."""
    parts = [p for p in parts if p.shape[0]]
    if not parts:
        return None
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    admm_sparse.prune_linear(layer, parts, ratio, keep_bits=None)
    return layer.weight.detach()


def held_out_error(weight: torch.Tensor, pruned: torch.Tensor | None, x: torch.Tensor) -> float:
    if pruned is None:
        return float("nan")
    return ((x @ (pruned - weight).T).norm() / (x @ weight.T).norm()).item()


def run(hidden=64, inter=128, experts=8, calib_tokens=1024, ratio=0.5, seed=0, skew=8.0):
    block = make_block(hidden, inter, experts, seed, skew)
    x_cal = correlated_inputs(calib_tokens, hidden, seed + 1)
    x_ho = correlated_inputs(20 * calib_tokens, hidden, seed + 1)[calib_tokens:]  # same mixing, new tokens
    r_cal, r_ho = route(block, x_cal), route(block, x_ho)
    routed = {e: x_cal[(r_cal == e).any(-1)] for e in range(experts)}
    pool_down = torch.cat([down_input(block, e, routed[e]) for e in range(experts)])
    rows = []
    for e in range(experts):
        n = routed[e].shape[0]
        held = x_ho[(r_ho == e).any(-1)]
        for matrix in ("gate", "up", "down"):
            weight = block[matrix][e]
            d_in = weight.shape[1]
            own = routed[e] if matrix != "down" else down_input(block, e, routed[e])
            test = held if matrix != "down" else down_input(block, e, held)
            all_tokens = x_cal if matrix != "down" else down_input(block, e, x_cal)
            pool = x_cal if matrix != "down" else pool_down
            missing = max(d_in - n, 0)
            treat = {"routed": [own],
                     "pooled": [own, pool * math.sqrt(missing / pool.shape[0])] if missing else [own],
                     "all tokens": [own, all_tokens * math.sqrt(missing / all_tokens.shape[0])] if missing else [own]}
            errors = {name: held_out_error(weight, prune(weight, parts, ratio), test) for name, parts in treat.items()}
            rows.append(dict(expert=e, matrix=matrix, tokens=n, d_in=d_in, held_out=test.shape[0], **errors))
    return rows


def table(rows, summary_rows, args) -> str:
    lines = [f"Synthetic MoE block: hidden {args.hidden}, intermediate {args.inter}, {args.experts} experts, top-2 "
             f"with a skewed router, {args.calib_tokens} calibration tokens, ratio {args.ratio}, keep-bit rounding off, "
             f"router skew {args.skew}, seed {args.seed} (the means below: seeds {args.seed}..{args.seed + args.seeds - 1}), torch {torch.__version__}, {torch.get_num_threads()} thread(s). Relative output error on "
             "held-out tokens routed to each expert (nan: the expert got no token and is left dense).", "",
             "| expert | matrix | calibration tokens | d_in | held-out tokens | " + " | ".join(TREATMENTS) + " |",
             "|---|---|---|---|---|" + "---|" * len(TREATMENTS)]
    for r in rows:
        if r["tokens"] >= r["d_in"]:
            continue  # enough tokens: all three treatments are the same
        lines.append(f"| {r['expert']} | {r['matrix']} | {r['tokens']} | {r['d_in']} | {r['held_out']} | "
                     + " | ".join(f"{r[t]:.4f}" for t in TREATMENTS) + " |")
    rare = [r for r in summary_rows if r["tokens"] < r["d_in"]]
    lines.append("")
    for t in TREATMENTS:
        finite = [r[t] for r in rare if not math.isnan(r[t])]
        lines.append(f"- {t}: mean held-out error {sum(finite) / max(len(finite), 1):.4f} over {len(finite)} of "
                     f"{len(rare)} starved matrices")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--inter", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--calib-tokens", type=int, default=1024)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=4, help="blocks (seeds) averaged in the summary (default 4)")
    p.add_argument("--skew", type=float, default=8.0, help="router bias from 0 (expert 0) down to -skew (the last)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true", help=f"replace this benchmark's section of {RESULTS_MD.name}")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():  # the routed treatment's singular-Hessian warnings are the point here
        warnings.simplefilter("ignore")
        runs = [run(args.hidden, args.inter, args.experts, args.calib_tokens, args.ratio, seed, args.skew)
                for seed in range(args.seed, args.seed + args.seeds)]
    text = table(runs[0], [r for rows in runs for r in rows], args)
    print(text)
    if args.write:
        section = (f"{BEGIN}\n## Rarely routed MoE experts: statistics for a starved expert\n\nCommand: "
                   f"`python benchmarks/bench_moe_prior.py --write`\n\n{text}\n{END}")
        write_section(RESULTS_MD, section, BEGIN, END)
    return text


if __name__ == "__main__":
    main()
