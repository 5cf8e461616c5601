"""Several processes against one: end-to-end time of `admm-sparse prune` on the built-in model, and a cost
model of the distributed run checked against it.

    python benchmarks/bench_distributed.py --write

`torchrun --nproc-per-node 2 -m admm_sparse prune` (Gloo, 1 thread per rank) and one process with 1 thread
run alternately, whole commands timed (loading included), median of --runs each. The cost model splits one
process's run (from its report: each block's seconds and each layer's ADMM seconds) into what divides over
N ranks (the calibration forwards and statistics: the windows are split) and what does not (each layer's
ADMM runs on one rank, so a block waits for its most loaded rank), plus the reduce/broadcast bytes; its
prediction for 2 ranks is printed next to the measurement. The same model then predicts LLaMA-2-70B on 8
GPUs of one node and on 2 nodes (figures labelled as predictions; the hardware numbers are stated).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from admm_sparse.distributed import Group, layer_cost  # noqa: E402
from benchmarks.results_md import RESULTS_MD, write_section  # noqa: E402

BEGIN, END = "<!-- distributed:begin -->", "<!-- distributed:end -->"


def command(ranks: int, out: Path, windows: int) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)] if ranks > 1 else \
        [sys.executable]
    return launch + ["-m", "admm_sparse", "prune", "--out", str(out), "--num-samples", str(windows),
                     "--eval-windows", "0", "--threads", "1", "--device", "cpu", "--no-progress", "--force"]


def predict_ranks(report: dict, ranks: int) -> dict:
    """Seconds of a run on `ranks` processes predicted from a one-process report of the same job."""
    layers = report["layers"]
    stack_blocks = report["block_seconds"]
    by_block: dict[str, list] = {}
    for row in layers:
        by_block.setdefault(".".join(row["name"].split(".")[:3]), []).append(row)
    admm, rest = 0.0, 0.0
    group = Group()
    group.size = ranks
    for (block, rows), seconds in zip(by_block.items(), stack_blocks):
        own = sum(r["seconds"] for r in rows)
        owners = group.assign([r["seconds"] for r in rows])  # measured per-layer cost in place of the formula
        admm += max(sum(r["seconds"] for r, o in zip(rows, owners) if o == rank) for rank in range(ranks))
        rest += (seconds - own) / ranks
    return {"admm": admm, "split": rest, "total": admm + rest}


def llama70b(ranks: int, nodes: int) -> dict:
    """Predicted seconds per block of LLaMA-2-70B (hidden 8192, intermediate 28672, GQA 8 KV heads of 128),
    64 x 512 calibration tokens, float32 GEMMs at 50 TFLOP/s per H100/H200 (TF32 off), NVLink 300 GB/s bus
    bandwidth inside a node, 50 GB/s (400 Gb/s InfiniBand) between nodes."""
    tokens, flops, h, inter, kv = 64 * 512, 50e12, 8192, 28672, 1024
    shapes = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (inter, h), "up": (inter, h),
              "down": (h, inter)}
    params = sum(a * b for a, b in shapes.values())
    forward = 2 * 2 * params * tokens / flops  # two passes (statistics, next inputs), 2 FLOP per weight
    groups = {"qkv": h, "o": h, "gate/up": h, "down": inter}  # one Hessian per input
    stats = sum(d * d * tokens for d in groups.values()) / flops  # half a GEMM each (one triangle), 2 FLOP
    admm = {name: 2 * layer_cost(shape) / flops for name, shape in shapes.items()}  # inverse + 20 GEMMs, 2 FLOP
    bandwidth = 300e9 if nodes == 1 else 50e9
    hessian_bytes = sum(d * d * 4 for d in groups.values())
    reduce_s = 2 * hessian_bytes * (ranks - 1) / ranks / bandwidth if ranks > 1 else 0.0
    broadcast_s = params * 4 / bandwidth if ranks > 1 else 0.0
    group = Group()
    group.size = ranks
    units = {"q/k/v": admm["q"] + admm["k"] + admm["v"], "o": admm["o"], "gate/up": admm["gate"] + admm["up"],
             "down": admm["down"]}
    owners = group.assign(list(units.values()))
    admm_s = max(sum(c for c, o in zip(units.values(), owners) if o == rank) for rank in range(ranks))
    return {"forward": forward / ranks, "statistics": stats / ranks, "reduce": reduce_s, "admm": admm_s,
            "broadcast": broadcast_s,
            "total": forward / ranks + stats / ranks + reduce_s + admm_s + broadcast_s,
            "admm_largest": max(units.values()), "admm_all": sum(units.values())}


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=64, help="calibration windows of 512 tokens (default 64)")
    p.add_argument("--runs", type=int, default=2, help="runs of each command (default 2)")
    p.add_argument("--write", action="store_true", help=f"replace this benchmark's section of {RESULTS_MD.name}")
    args = p.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from admm_sparse.builtin import load_model

    load_model(None)  # the dequantised GGUF cache exists before any timed run (the first run would make it)
    seconds = {1: [], 2: []}
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            for ranks in (2, 1):
                out = Path(tmp) / f"out-{ranks}"
                start = time.perf_counter()
                subprocess.run(command(ranks, out, args.windows), check=True, capture_output=True, env=env, cwd=ROOT)
                seconds[ranks].append(time.perf_counter() - start)
                reports[ranks] = json.loads((out / "prune_report.json").read_text())
    report = reports[1]
    med = {k: statistics.median(v) for k, v in seconds.items()}
    model = predict_ranks(report, 2)
    one = sum(report["block_seconds"])
    lines = [f"Built-in SmolLM2-135M, ratio 0.3 (the default config), Atlas, {args.windows} calibration windows of 512 "
             f"tokens, no evaluation; 1 thread per process; torch {torch.__version__}, Gloo; commands alternated, "
             f"{args.runs} runs each, whole commands timed (loading included; the dequantised model's cache made "
             "beforehand).", "",
             "| processes | median s | runs s |", "|---|---|---|"]
    for ranks in (1, 2):
        lines.append(f"| {ranks} | {med[ranks]:.1f} | {', '.join(f'{s:.1f}' for s in seconds[ranks])} |")
    loops = {ranks: sum(r["block_seconds"]) for ranks, r in reports.items()}
    lines += ["", f"Speed-up of 2 processes: **{med[1] / med[2]:.2f}x** end to end (target at least 1.7x). The block "
              f"loop (rank 0's report, last run) took {loops[1]:.1f} s in one process and {loops[2]:.1f} s in two "
              f"({loops[1] / loops[2]:.2f}x); the rest (start-up, loading, capture, export) {seconds[1][-1] - loops[1]:.1f}"
              f" s and {seconds[2][-1] - loops[2]:.1f} s.", "",
              "Cost model, from the one-process run's report (block loop only, loading excluded): its blocks took "
              f"{one:.1f} s, of which ADMM {sum(r['seconds'] for r in report['layers']):.1f} s. On 2 ranks the "
              f"calibration forwards and statistics halve ({model['split']:.1f} s) and each block waits for its more "
              f"loaded rank's ADMM ({model['admm']:.1f} s): predicted block loop {model['total']:.1f} s, a "
              f"{one / model['total']:.2f}x speed-up of the loop (the reduce and broadcast bytes, a few MB per block, "
              "cost milliseconds on one machine).", "",
              "Prediction (not measured): LLaMA-2-70B, 80 blocks, seconds per block:", "",
              "| setting | forwards | statistics | reduce | ADMM (most loaded rank) | broadcast | per block | 80 blocks, min |",
              "|---|---|---|---|---|---|---|---|"]
    for label, ranks, nodes in (("1 GPU", 1, 1), ("8 GPUs, one node (NVLink)", 8, 1), ("16 GPUs, 2 nodes", 16, 2)):
        c = llama70b(ranks, nodes)
        lines.append(f"| {label} | {c['forward']:.2f} | {c['statistics']:.2f} | {c['reduce']:.2f} | {c['admm']:.2f} | "
                     f"{c['broadcast']:.2f} | {c['total']:.2f} | {80 * c['total'] / 60:.1f} |")
    c = llama70b(8, 1)
    split = c["forward"] + c["statistics"] + c["reduce"] + c["broadcast"] + c["admm_all"] / 8
    lines += ["", f"Where scaling stops: a block's ADMM cannot finish before its largest statistics group (down_proj, "
              f"{c['admm_largest']:.2f} s of the block's {c['admm_all']:.2f} s), so past 2 ranks more GPUs only shorten "
              "the forwards and statistics, and between nodes the reduce of the Hessians grows. What would lift the "
              "bound is splitting a layer's output rows over ranks: the GEMMs and the projection are row-independent, "
              "only the unstructured k-smallest selection is global (an all-reduce of the radix select's histograms, "
              "15 times per layer, a few KB each). Predicted with it, 8 GPUs: "
              f"{split:.2f} s per block ({80 * split / 60:.1f} min instead of {80 * c['total'] / 60:.1f}). It is not built "
              "yet: on this 2-core machine the 2 ranks are balanced without it (the measurement above), and it needs "
              "the native select to take a histogram reduction between its sweeps; it is the next step for GPUs."]
    text = "\n".join(lines)
    print(text)
    if args.write:
        section = (f"{BEGIN}\n## Several processes (torch.distributed)\n\nCommand: "
                   f"`python benchmarks/bench_distributed.py --windows {args.windows} --runs {args.runs} --write`\n\n{text}\n{END}")
        write_section(RESULTS_MD, section, BEGIN, END)
    return text


if __name__ == "__main__":
    main()
