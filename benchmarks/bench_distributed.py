"""Several processes against one: end-to-end time of `admm-sparse prune` on the built-in model, and a cost
model of the distributed run checked against it.

    python benchmarks/bench_distributed.py --write

`torchrun --nproc-per-node 2 -m admm_sparse prune` (Gloo, 1 thread per rank) and one process with 1 thread
run alternately, whole commands timed (loading included), median of --runs each, for two jobs: the default
config, and down_proj alone, whose layer per block is split over both ranks by its rows. The cost model splits one
process's run (from its report: each block's seconds and each layer's ADMM seconds) into what divides over
N ranks (the calibration forwards and statistics: the windows are split) and what does not (each layer's
ADMM runs on one rank, so a block waits for its most loaded rank), plus the reduce/broadcast bytes; its
prediction for 2 ranks is printed next to the measurement.

    python benchmarks/bench_distributed.py --predict-70b --write

The same model predicts LLaMA-2-70B on 8 GPUs of one node and on 2 nodes (figures labelled as predictions; the
link speeds are stated), from the per-op times bench_op_times.py measured on a GPU (benchmarks/results/op_times.json),
or from the FLOP count where none were measured.
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

from admm_sparse.distributed import Group, layer_cost, split_layers  # noqa: E402
from admm_sparse.split import DIGITS  # noqa: E402
from benchmarks.results_md import RESULTS_MD, write_section  # noqa: E402

BEGIN, END = "<!-- distributed:begin -->", "<!-- distributed:end -->"
PREDICTION_BEGIN, PREDICTION_END = "<!-- llama70b:begin -->", "<!-- llama70b:end -->"
OP_TIMES = ROOT / "benchmarks" / "results" / "op_times.json"  # written by bench_op_times.py on a GPU


def command(ranks: int, out: Path, windows: int, extra: list[str]) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)] if ranks > 1 else \
        [sys.executable]
    return launch + ["-m", "admm_sparse", "prune", "--out", str(out), "--num-samples", str(windows),
                     "--eval-windows", "0", "--threads", "1", "--device", "cpu", "--no-progress", "--force", *extra]


# The two jobs timed: the default config (no layer costs more than half a block on 2 ranks: whole layers are
# assigned), and down_proj alone (one layer per block: split over both ranks by its rows, admm_sparse.split).
JOBS = {"all layers": [], "down_proj only (split over the ranks)": ["--include", "*down_proj"]}


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


def llama70b(ranks: int, nodes: int, measured: dict | None = None) -> dict:
    """Predicted seconds per block of LLaMA-2-70B (hidden 8192, intermediate 28672, GQA 8 KV heads of 128),
    64 x 512 calibration tokens. measured: benchmarks/results/op_times.json (bench_op_times.py: each op timed on
    one GPU); without it, the FLOP count at 50 TFLOP/s float32 per H100/H200 (TF32 off). Links: NVLink 300 GB/s bus
    bandwidth inside a node, 50 GB/s (400 Gb/s InfiniBand) between nodes."""
    tokens, flops, h, inter, kv = 64 * 512, 50e12, 8192, 28672, 1024
    shapes = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (inter, h), "up": (inter, h),
              "down": (h, inter)}
    params = sum(a * b for a, b in shapes.values())
    groups = {"qkv": h, "o": h, "gate/up": h, "down": inter}  # one Hessian per input
    names = list(shapes)
    # A split layer's histogram all-reduces: 15 reselections x 4 sweeps + the tie counts, latency-bound (~20 us).
    select_s = 15 * (len(DIGITS) + 2) * 20e-6
    if measured:
        t = measured["seconds"]
        forward = 2 * sum(t["forward"].values())  # two passes (statistics, next inputs)
        stats = sum(t["statistics"].values())
        admm = dict(t["admm"])
        share = t["admm_split"].get(str(ranks))
        if share is None and ranks > 1:
            raise ValueError(f"{OP_TIMES.name} has no split times for {ranks} ranks: re-run bench_op_times.py "
                             f"--ranks {ranks}")
    else:
        forward = 2 * 2 * params * tokens / flops  # two passes, 2 FLOP per weight
        stats = sum(d * d * tokens for d in groups.values()) / flops  # half a GEMM each (one triangle), 2 FLOP
        admm = {name: 2 * layer_cost(shape) / flops for name, shape in shapes.items()}  # inverse + 20 GEMMs
        inverse = {n: 2 * float(shapes[n][1]) ** 3 / flops for n in names}
        share = {n: inverse[n] + (admm[n] - inverse[n]) / ranks for n in names}  # the inverse on every rank
    bandwidth = 300e9 if nodes == 1 else 50e9
    hessian_bytes = sum(d * d * 8 for d in groups.values())  # the statistics travel as float64 sums
    reduce_s = 2 * hessian_bytes * (ranks - 1) / ranks / bandwidth if ranks > 1 else 0.0
    broadcast_s = params * 4 / bandwidth if ranks > 1 else 0.0
    split = {names[i] for i in split_layers([admm[n] for n in names], ranks)}  # as the block loop decides
    split_s = sum(share[n] + select_s for n in split)
    group = Group()
    group.size = ranks
    whole = [n for n in names if n not in split]
    owners = group.assign([admm[n] for n in whole])
    admm_s = split_s + max(sum(admm[n] for n, o in zip(whole, owners) if o == rank) for rank in range(ranks))
    return {"forward": forward / ranks, "statistics": stats / ranks, "reduce": reduce_s, "admm": admm_s,
            "broadcast": broadcast_s,
            "total": forward / ranks + stats / ranks + reduce_s + admm_s + broadcast_s,
            "admm_all": sum(admm.values()), "admm_down": admm["down"], "split": sorted(split)}


def prediction_70b() -> str:
    """The LLaMA-2-70B prediction's text: from measured per-op times where op_times.json exists."""
    measured = json.loads(OP_TIMES.read_text()) if OP_TIMES.exists() else None
    source = (f"per-op times measured on one {measured['device']} (torch {measured['torch']}, TF32 off; "
              "`python benchmarks/bench_op_times.py --device cuda --write`, table below)" if measured else
              "the FLOP count at 50 TFLOP/s float32 per GPU (no per-op times measured: run bench_op_times.py on a GPU)")
    lines = [f"Prediction (not measured end to end): LLaMA-2-70B, 80 blocks, seconds per block, from {source}:", "",
             "| setting | forwards | statistics | reduce | ADMM (most loaded rank) | broadcast | per block | 80 blocks, min |",
             "|---|---|---|---|---|---|---|---|"]
    for label, ranks, nodes in (("1 GPU", 1, 1), ("8 GPUs, one node (NVLink)", 8, 1), ("16 GPUs, 2 nodes", 16, 2)):
        c = llama70b(ranks, nodes, measured)
        lines.append(f"| {label} | {c['forward']:.2f} | {c['statistics']:.2f} | {c['reduce']:.2f} | {c['admm']:.2f} | "
                     f"{c['broadcast']:.2f} | {c['total']:.2f} | {80 * c['total'] / 60:.1f} |")
    c = llama70b(8, 1, measured)
    lines += ["", f"On 8 GPUs the cost model splits {', '.join(c['split'])} over the ranks by their rows (each costs more "
              "than an even share of the block; admm_sparse.distributed.split_layers, the rule the block loop uses): "
              "each rank still takes the split layer's d_in³ inverse, and its share of the GEMMs and passes; the "
              "selection's histogram all-reduces are latency-bound (60 per layer, 20 us each assumed). Without the "
              f"split a block would wait for down_proj's whole ADMM ({c['admm_down']:.2f} s). Links assumed: NVLink "
              "300 GB/s in a node, 50 GB/s between nodes."]
    if measured:
        t = measured["seconds"]
        lines += ["", "Per-op seconds measured (one block; forwards: bfloat16 GEMMs over 32768 tokens; statistics: "
                  "accumulate_sums per 512-token window; ADMM: the seed-mode op at ratio 0.3, whole and one rank's "
                  "share of a split):", "",
                  "| op | " + " | ".join(t["admm"]) + " |", "|---|" + "---:|" * len(t["admm"])]
        rows = [("forward", t["forward"]), ("ADMM, whole", t["admm"])] + \
            [(f"ADMM, 1/{r} of the rows", share) for r, share in t["admm_split"].items()]
        lines += [f"| {label} | " + " | ".join(f"{row[n]:.3f}" for n in t["admm"]) + " |" for label, row in rows]
        lines += ["", "Statistics: " + ", ".join(f"{n} input {s:.3f} s" for n, s in t["statistics"].items()) + "."]
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=64, help="calibration windows of 512 tokens (default 64)")
    p.add_argument("--runs", type=int, default=2, help="runs of each command (default 2)")
    p.add_argument("--write", action="store_true", help=f"replace this benchmark's section of {RESULTS_MD.name}")
    p.add_argument("--predict-70b", action="store_true",
                   help="only the LLaMA-2-70B prediction (from benchmarks/results/op_times.json where it exists)")
    args = p.parse_args(argv)
    if args.predict_70b:
        return write_prediction(args.write)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from admm_sparse.builtin import load_model

    load_model(None)  # the dequantised GGUF cache exists before any timed run (the first run would make it)
    seconds = {(job, ranks): [] for job in JOBS for ranks in (1, 2)}
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            for job, extra in JOBS.items():
                for ranks in (2, 1):
                    out = Path(tmp) / f"out-{ranks}"
                    start = time.perf_counter()
                    subprocess.run(command(ranks, out, args.windows, extra), check=True, capture_output=True, env=env,
                                   cwd=ROOT)
                    seconds[job, ranks].append(time.perf_counter() - start)
                    reports[job, ranks] = json.loads((out / "prune_report.json").read_text())
    splits = {job: sum("split_over" in row for row in reports[job, 2]["layers"]) for job in JOBS}
    med = {key: statistics.median(runs) for key, runs in seconds.items()}
    main_job = next(iter(JOBS))  # the default config: the speed-up target and the cost model's check
    report = reports[main_job, 1]
    model = predict_ranks(report, 2)
    one = sum(report["block_seconds"])
    lines = [f"Built-in SmolLM2-135M, ratio 0.3 (the default config), Atlas, {args.windows} calibration windows of 512 "
             f"tokens, no evaluation; 1 thread per process; torch {torch.__version__}, Gloo; commands alternated, "
             f"{args.runs} runs each, whole commands timed (loading included; the dequantised model's cache made "
             "beforehand).", "",
             "| job | processes | layers split over the ranks | median s | runs s | speed-up |", "|---|---|---|---|---|---|"]
    for job in JOBS:
        for ranks in (1, 2):
            lines.append(f"| {job} | {ranks} | {splits[job] if ranks == 2 else 0} | {med[job, ranks]:.1f} | "
                         f"{', '.join(f'{s:.1f}' for s in seconds[job, ranks])} | "
                         f"{med[job, 1] / med[job, ranks]:.2f}x |")
    loops = {ranks: sum(reports[main_job, ranks]["block_seconds"]) for ranks in (1, 2)}
    rest = {ranks: seconds[main_job, ranks][-1] - loops[ranks] for ranks in (1, 2)}
    lines += ["", f"Speed-up of 2 processes, all layers: **{med[main_job, 1] / med[main_job, 2]:.2f}x** end to end "
              f"(target at least 1.7x). The block loop (rank 0's report, last run) took {loops[1]:.1f} s in one process "
              f"and {loops[2]:.1f} s in two ({loops[1] / loops[2]:.2f}x); the rest (start-up, loading, capture, export) "
              f"{rest[1]:.1f} s and {rest[2]:.1f} s.", "",
              "Cost model, from the one-process run's report (block loop only, loading excluded): its blocks took "
              f"{one:.1f} s, of which ADMM {sum(r['seconds'] for r in report['layers']):.1f} s. On 2 ranks the "
              f"calibration forwards and statistics halve ({model['split']:.1f} s) and each block waits for its more "
              f"loaded rank's ADMM ({model['admm']:.1f} s): predicted block loop {model['total']:.1f} s, a "
              f"{one / model['total']:.2f}x speed-up of the loop (the reduce and broadcast bytes, a few MB per block, "
              "cost milliseconds on one machine)."]
    text = "\n".join(lines)
    print(text)
    if args.write:
        section = (f"{BEGIN}\n## Several processes (torch.distributed)\n\nCommand: "
                   f"`python benchmarks/bench_distributed.py --windows {args.windows} --runs {args.runs} --write`\n\n{text}\n{END}")
        write_section(RESULTS_MD, section, BEGIN, END)
    return text


def write_prediction(write: bool) -> str:
    text = prediction_70b()
    print(text)
    if write:
        section = (f"{PREDICTION_BEGIN}\n### LLaMA-2-70B on 8 and 16 GPUs: the cost model's prediction\n\nCommand: "
                   f"`python benchmarks/bench_distributed.py --predict-70b --write`\n\n{text}\n{PREDICTION_END}")
        write_section(RESULTS_MD, section, PREDICTION_BEGIN, PREDICTION_END)
    return text


if __name__ == "__main__":
    main()
