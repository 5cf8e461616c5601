"""The same model from 1 and N processes: `admm-sparse prune` on the built-in model in one process and under
`torchrun --nproc-per-node N` (Gloo, 1 thread per process), in seed and fast modes with keep-bit rounding on and
off, and the two output folders compared tensor by tensor.

    python benchmarks/parity.py --write            # ratio 0.5, 8 windows of 256 tokens, 2 processes
    python benchmarks/parity.py --runs seed-keepbits --ranks 4
    python benchmarks/parity.py --runs seed --one-process-threads 2                        # 2 threads against 2 x 1
    python benchmarks/parity.py --runs seed --one-process-threads 2 --mkl-cbwr COMPATIBLE  # MKL's reproducible mode

Reported per run: the pruned layers' mask entries that agree, the tensors that differ in any bit, the worst
relative Frobenius difference of a tensor, and both runs' perplexities (evaluation windows on, as by default).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.results_md import RESULTS_MD, write_section  # noqa: E402

BEGIN, END = "<!-- parity:begin -->", "<!-- parity:end -->"
RUNS = {"seed-keepbits": [], "seed": ["--keep-bits", "none"], "fast-keepbits": ["--mode", "fast"],
        "fast": ["--mode", "fast", "--keep-bits", "none"]}


def prune(ranks: int, out: Path, extra: list[str], args) -> None:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    threads = str(args.one_process_threads if ranks == 1 else 1)
    command = launch + ["-m", "admm_sparse", "prune", "--sparse-ratio", str(args.ratio), "--num-samples",
                        str(args.windows), "--seq-len", str(args.seq_len), "--format", "hf", "--threads", threads,
                        "--device", "cpu", "--no-progress", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": threads, **({"MKL_CBWR": args.mkl_cbwr} if args.mkl_cbwr else {})}
    subprocess.run(command, check=True, capture_output=True, env=env, cwd=ROOT)


def tensors(folder: Path):
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def compare(a: Path, b: Path) -> dict:
    other = dict(tensors(b))
    equal = entries = differ = count = 0
    worst = 0.0
    for name, x in tensors(a):
        y = other.pop(name)
        count += 1
        differ += not torch.equal(x, y)
        if x.dim() == 2 and ".layers." in name:  # the decoder's pruned weights
            entries += x.numel()
            equal += int(((x == 0) == (y == 0)).sum())
            worst = max(worst, ((x.float() - y.float()).norm() / x.float().norm().clamp_min(1e-30)).item())
    if other:
        raise RuntimeError(f"{b} has tensors {a} lacks: {sorted(other)[:3]}")
    perplexity = [json.loads((f / "prune_report.json").read_text())["perplexity"] for f in (a, b)]
    return dict(equal=equal, entries=entries, differ=differ, count=count, worst=worst,
                perplexity=[p and p["after"] for p in perplexity])


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--one-process-threads", type=int, default=1, help="threads of the one-process run (default 1; "
                   "each of the N processes has 1)")
    p.add_argument("--mkl-cbwr", help="MKL_CBWR for every process, e.g. COMPATIBLE (MKL's reproducible code path)")
    p.add_argument("--write", action="store_true", help=f"replace this benchmark's section of {RESULTS_MD.name}")
    args = p.parse_args(argv)
    threads = "1 thread per process" if args.one_process_threads == 1 else \
        f"{args.one_process_threads} threads in the one process, 1 in each of the {args.ranks}"
    mkl = f", MKL_CBWR={args.mkl_cbwr}" if args.mkl_cbwr else ""
    lines = [f"Built-in SmolLM2-135M, the default config with sparse_ratio {args.ratio}, {args.windows} calibration "
             f"windows of {args.seq_len} tokens, Hugging Face format, {threads}{mkl}; torch {torch.__version__}, "
             "Gloo.", "",
             f"| run | mask entries equal | tensors differing in any bit | worst relative difference | perplexity 1 "
             f"process | perplexity {args.ranks} processes |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            folders = [Path(tmp) / f"{name}-{ranks}" for ranks in (1, args.ranks)]
            for ranks, folder in zip((1, args.ranks), folders):
                prune(ranks, folder, RUNS[name], args)
            c = compare(*folders)
            lines.append(f"| {name} | {c['equal']}/{c['entries']} ({c['equal'] / c['entries']:.4%}) | {c['differ']}/"
                         f"{c['count']} | {c['worst']:.3g} | {c['perplexity'][0]:.6f} | {c['perplexity'][1]:.6f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.write:
        command = "python benchmarks/parity.py" + (" " + " ".join(argv) if argv else "")
        section = (f"{BEGIN}\n## The same model from 1 and {args.ranks} processes\n\nCommand: `{command}`\n\n"
                   f"{text}\n{END}")
        write_section(RESULTS_MD, section, BEGIN, END)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
