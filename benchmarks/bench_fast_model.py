"""Fast mode on the whole built-in model against SparseGPT and the seed mode, in one process: end-to-end prune
time (the block loop of admm_sparse.pipeline, then the Atlas export), where it goes, and the perplexity.

    python benchmarks/bench_fast_model.py --write

BENCHMARKS.md protocol: SmolLM2-135M, 64 calibration windows of 512 tokens, perplexity on 100 held-out windows
of 512 (float32). Keep-bit rounding off in every method (SparseGPT has none), so the three prune the same thing.
The methods run one after the other from the same dense weights, alternating over --rounds; each is timed as
a whole (block loop: calibration forwards, statistics, solver; then the export) with the time split by
timing each pruner's add_batch (statistics) and fasterprune (solver); the forwards are the rest of the loop.
"""
from __future__ import annotations

import argparse
import copy
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from admm_sparse import device as devices  # noqa: E402
from admm_sparse.config import FloatSparseConfig  # noqa: E402
from admm_sparse.layer import AdmmPruner  # noqa: E402
from benchmarks.baselines import SparseGPTPruner  # noqa: E402
from benchmarks.results_md import RESULTS_MD, write_section  # noqa: E402

BEGIN, END = "<!-- fast-model:begin -->", "<!-- fast-model:end -->"

# name -> (config options, pruner class); the ADMM rows take the config's mode.
METHODS = {
    "fast": (dict(mode="fast"), "admm"),
    "fast, float32 forwards": (dict(mode="fast", calibration_dtype="model"), "admm"),
    "SparseGPT": (dict(), "sparsegpt"),
    # the baseline at the speed it honestly allows: its calibration forwards in bfloat16 autocast as fast mode's
    "SparseGPT, bfloat16 forwards": (dict(calibration_dtype="bfloat16"), "sparsegpt"),
    "seed": (dict(mode="seed"), "admm"),
}


class Clock:
    """Seconds spent in the pruners' add_batch and fasterprune during one run."""

    def __init__(self):
        self.statistics = self.solver = 0.0

    def timed(self, cls):
        clock = self

        class Timed(cls):
            def add_batch(self, inp):
                start = time.perf_counter()
                super().add_batch(inp)
                clock.statistics += time.perf_counter() - start

            def fasterprune(self, *args, **kwargs):
                start = time.perf_counter()
                report = super().fasterprune(*args, **kwargs)
                clock.solver += time.perf_counter() - start
                return report

        return Timed


def run_method(name: str, model, calib, ratio: float) -> dict:
    from admm_sparse.export import export_model
    from admm_sparse.pipeline import prune_blocks

    options, kind = METHODS[name]
    config = FloatSparseConfig(sparse_ratio=ratio, keep_bits=None, **options)
    clock = Clock()
    if kind == "admm":
        cls = clock.timed(AdmmPruner)
        make_pruner = lambda n, t: cls(t, **config.pruner_options())  # noqa: E731
    else:
        cls = clock.timed(SparseGPTPruner)
        make_pruner = lambda n, t: cls(t)  # noqa: E731
    start = time.perf_counter()
    result = prune_blocks(model, calib, config, make_pruner=make_pruner, progress=False)
    loop = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        export_model(model, Path(tmp) / "out", [r["name"] for r in result.rows])
        export = time.perf_counter() - start
    return dict(total=loop + export, loop=loop, statistics=clock.statistics, solver=clock.solver,
                forwards=loop - clock.statistics - clock.solver, export=export)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--windows", type=int, default=64, help="calibration windows of 512 tokens")
    p.add_argument("--eval-windows", type=int, default=100)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--rounds", type=int, default=1, help="the methods alternate this many times (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true", help="store the tables in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from admm_sparse.builtin import load_builtin
    from admm_sparse.evaluate import perplexity

    data = load_builtin(num_calib=args.windows, seq_len=512)
    dense = copy.deepcopy(data.model.state_dict())
    times: dict[str, list[dict]] = {m: [] for m in args.methods}
    ppl: dict[str, float] = {}
    for _ in range(args.rounds):
        for name in args.methods:
            data.model.load_state_dict(dense)
            times[name].append(run_method(name, data.model, data.calib, args.ratio))
            if name not in ppl:
                ppl[name] = perplexity(data.model, data.heldout, seq_len=512, num_windows=args.eval_windows,
                                       progress=False)
            print(name, {k: round(v, 1) for k, v in times[name][-1].items()}, f"perplexity {ppl[name]:.2f}",
                  flush=True)
    data.model.load_state_dict(dense)
    dense_ppl = perplexity(data.model, data.heldout, seq_len=512, num_windows=args.eval_windows, progress=False)
    med = {m: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for m, runs in times.items()}
    # against the faster SparseGPT row measured
    base = min((m["total"] for name, m in med.items() if name.startswith("SparseGPT")), default=None)
    command = "python " + " ".join(shlex.quote(a) for a in
                                   ["benchmarks/bench_fast_model.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"Command: `{command}`", "",
             f"Built-in SmolLM2-135M, ratio {args.ratio}, keep-bit rounding off, {args.windows} x 512 calibration "
             f"tokens, perplexity on {args.eval_windows} x 512 held-out tokens (dense {dense_ppl:.2f}); torch "
             f"{torch.__version__}, {args.threads} thread(s), {platform.machine()}; fast mode's low-precision "
             f"dtype here: {str(devices.gemm_dtype(torch.device('cpu'))).removeprefix('torch.')}; "
             f"median of {args.rounds} round(s), the methods alternating. Seconds:", "",
             "| method | end to end | x the faster SparseGPT | calibration forwards | statistics | solver | export "
             "| perplexity |", "|---|---|---|---|---|---|---|---|"]
    for name, m in med.items():
        ratio = f"{m['total'] / base:.2f}" if base else "-"
        lines.append(f"| {name} | {m['total']:.1f} | {ratio} | {m['forwards']:.1f} | {m['statistics']:.1f} "
                     f"| {m['solver']:.1f} | {m['export']:.1f} | {ppl[name]:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(RESULTS_MD, f"{BEGIN}\n### The whole model against SparseGPT at full speed (issues 18 and 30)"
                                  f"\n\n{text}\n{END}", BEGIN, END)


if __name__ == "__main__":
    main()
