"""Fast mode against the seed mode and SparseGPT on one layer, side by side in one process: time and relative
output error on held-out inputs (statistics from the first half of the tokens, error ||X (W - W')ᵀ|| / ||X Wᵀ||
on the second half).

    python benchmarks/bench_fast.py                         # 1024, 2048, 4096 square layers; prints tables
    python benchmarks/bench_fast.py --write                 # and stores them in benchmarks/RESULTS.md
    python benchmarks/bench_fast.py --shapes 4096x11008 --repeats 1 --methods fast sparsegpt algorithm1
    python benchmarks/bench_fast.py --real                  # the built-in model's layers instead
    python benchmarks/bench_fast.py --growth 1024 2048 4096 8192 --repeats 1   # time against d_in, log-log
    python benchmarks/bench_fast.py --profile --shapes 2048x2048   # where fast mode's time goes

Protocol: every run of every method starts from the calibration tokens: its statistics (H = XᵀX) are
accumulated afresh and timed ("statistics"), then its solver ("solver": fasterprune, for ADMM the
factorisation included: nothing is cached between runs). The methods alternate, each repeat; medians.
SparseGPT is twice here: benchmarks/baselines.py (the yardstick, made as fast as the algorithm allows: its
statistics with the library's kernel) and algorithm1() below, Algorithm 1 of the paper transcribed as printed
in plain PyTorch (statistics X.T @ X), which checks that the yardstick is not slower than the method.

Inputs: "iid" are bench_core's (independent unit-variance channels); "correlated" mix the channels and give
them log-normal scales, as real activations have (tests/test_quality.py's generator). Keep-bit rounding is
off in every mode (SparseGPT has none): this compares the pruning alone.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from admm_sparse import device as devices, fast  # noqa: E402
from admm_sparse.layer import AdmmPruner  # noqa: E402
from benchmarks.baselines import SparseGPTPruner, relative_output_error  # noqa: E402
from benchmarks.results_md import RESULTS_MD, write_section  # noqa: E402

BEGIN, END = "<!-- fast:begin -->", "<!-- fast:end -->"
METHODS = ("seed", "fast", "sparsegpt", "algorithm1")
SPARSEGPTS = ("sparsegpt", "algorithm1")


def algorithm1(W: torch.Tensor, H: torch.Tensor, p: float, B: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT, Frantar & Alistarh 2023, Algorithm 1 as printed (mask blocks Bs = lazy blocks B, damping as in
    their code), in plain PyTorch on torch's threads: the check on benchmarks/baselines.py's speed."""
    d_out, d_in = W.shape
    W, H = W.clone(), H.clone()
    H.diagonal().add_(percdamp * H.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # Cholesky(H⁻¹)ᵀ
    M = torch.zeros_like(W, dtype=torch.bool)  # True: pruned
    E = W.new_zeros(d_out, B)
    for i in range(0, d_in, B):
        end = min(i + B, d_in)  # the last block is shorter where B does not divide d_in, as in the authors' code
        for j in range(i, end):
            if j == i:  # prune the p share of w²/[H⁻¹]cc² smallest in W[:, i:end]
                score = W[:, i:end] ** 2 / Hinv.diagonal()[i:end] ** 2
                block = torch.zeros(score.numel(), dtype=torch.bool, device=W.device)
                block[torch.topk(score.flatten(), int(score.numel() * p), largest=False).indices] = True
                M[:, i:end] = block.view_as(score)
            E[:, j - i] = W[:, j] / Hinv[j, j] * M[:, j]
            W[:, j:end] -= E[:, j - i, None] * Hinv[j, j:end]
        W[:, end:] -= E[:, :end - i] @ Hinv[i:end, end:]
    W[M] = 0
    return W


def make_inputs(kind: str, tokens: int, d_in: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g)
    if kind == "correlated":
        x = x @ (torch.randn(d_in, d_in, generator=g) * (2 / math.sqrt(d_in)) + torch.eye(d_in))
        x = x * torch.exp(torch.randn(d_in, generator=g) * 0.7)
    return x


@contextmanager
def patched(module, **values):
    old = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)


# Fast mode with one lever taken away or changed at a time (--levers): a module's attributes patched for one call.
LEVERS = {
    "fast": (fast, {}),
    "fast, float32 GEMMs (no bfloat16)": (devices, dict(_bfloat16_faster=lambda device_type: False)),
    "fast, no over-relaxation (alpha 1)": (fast, dict(ALPHA=1.0)),
    "fast, no early stop (15 re-selections)": (fast, dict(MASK_TOL=-1.0)),
    "fast, mask tolerance 0.3% of k": (fast, dict(MASK_TOL=0.003)),
    "fast, 5 iterations on the settled mask": (fast, dict(FIXED_ITERS=5)),
}


def run(method: str, w0: torch.Tensor, calib: list[torch.Tensor], layer: nn.Linear, ratio: float):
    """One run from the calibration tokens: (statistics seconds, solver seconds, ADMM iterations); the pruned
    weight is left in layer."""
    layer.weight.data.copy_(w0)
    start = time.perf_counter()
    if method == "algorithm1":
        H = torch.zeros(w0.shape[1], w0.shape[1])
        for x in calib:
            x = x.reshape(-1, x.shape[-1])  # the built-in model's captured inputs are (windows, tokens, d_in)
            H.addmm_(x.T, x)
        statistics_s = time.perf_counter() - start
        start = time.perf_counter()
        layer.weight.data.copy_(algorithm1(w0, H, ratio))
        return statistics_s, time.perf_counter() - start, None
    pruner = SparseGPTPruner(layer) if method == "sparsegpt" else AdmmPruner(layer, keep_bits=None)
    for x in calib:
        pruner.add_batch(x)
    statistics_s = time.perf_counter() - start
    if method == "sparsegpt":
        report = pruner.fasterprune(ratio)
    elif method == "seed":
        report = pruner.fasterprune(ratio, mode="seed")
    else:
        options = dict(fast_mask_iters=15) if method == "fast, no early stop (15 re-selections)" else {}
        module, values = LEVERS[method]
        with patched(module, **values):
            report = pruner.fasterprune(ratio, mode="fast", **options)
    pruner.free()
    return statistics_s, report.seconds, getattr(report, "iterations", None)


def compare(w0: torch.Tensor, calib: list[torch.Tensor], heldout_gram: torch.Tensor, ratio: float,
            repeats: int, methods=METHODS) -> dict:
    """Statistics and solver seconds (medians over repeats, the methods alternating), held-out error and
    iterations of each method."""
    layer = nn.Linear(w0.shape[1], w0.shape[0], bias=False)
    stats, solver, errors, iterations = ({m: [] for m in methods} for _ in range(4))
    for _ in range(repeats):
        for method in methods:
            s_stats, s_solver, iterations[method] = run(method, w0, calib, layer, ratio)
            stats[method].append(s_stats)
            solver[method].append(s_solver)
            errors[method] = relative_output_error(w0, layer.weight.detach(), heldout_gram)
    med = lambda d: {m: statistics.median(t) for m, t in d.items()}  # noqa: E731
    return dict(statistics=med(stats), seconds=med(solver), errors=errors, iterations=iterations)


def synthetic(shape: tuple[int, int], kind: str, tokens: int, ratio: float, repeats: int, methods=METHODS) -> dict:
    d_out, d_in = shape
    x = make_inputs(kind, 2 * tokens, d_in)
    w0 = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(1)) / math.sqrt(d_in)
    heldout = x[tokens:]
    gram = heldout.T.double() @ heldout.double()
    del heldout
    return compare(w0, [x[:tokens]], gram, ratio, repeats, methods)


def row(label: str, r: dict) -> str:
    s, st, e = r["seconds"], r["statistics"], r["errors"]
    f = lambda d, m, fmt: format(d[m], fmt) if m in d else "-"  # noqa: E731
    best = min((m for m in SPARSEGPTS if m in s), key=lambda m: s[m])
    best_total = min((m for m in SPARSEGPTS if m in s), key=lambda m: s[m] + st[m])
    ratio_error = f"{e['fast'] / e['seed']:.4f}" if "seed" in e else "-"
    return (f"| {label} | {f(s, 'seed', '.2f')} | {s['fast']:.2f} | {f(s, 'sparsegpt', '.2f')} "
            f"| {f(s, 'algorithm1', '.2f')} | **{s['fast'] / s[best]:.2f}** | {st['fast']:.2f} "
            f"| {f(st, 'sparsegpt', '.2f')} | {f(st, 'algorithm1', '.2f')} "
            f"| **{(s['fast'] + st['fast']) / (s[best_total] + st[best_total]):.2f}** | {f(e, 'seed', '.5f')} "
            f"| {e['fast']:.5f} | {f(e, 'sparsegpt', '.5f')} | {f(e, 'algorithm1', '.5f')} | {ratio_error} "
            f"| {r['iterations']['fast']} |")


HEADER = ["| layer | seed s | fast s | SparseGPT s | Alg. 1 s | fast / faster SparseGPT, solvers | statistics s, "
          "ADMM | statistics s, SparseGPT | statistics s, Alg. 1 | fast / faster SparseGPT, with statistics "
          "| seed error | fast error | SparseGPT error | Alg. 1 error | fast / seed error | fast iterations |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


LEVER_HEADER = ["| layer | setting | seconds | x seed time | held-out error | x seed error | iterations |",
                "|---|---|---|---|---|---|---|"]


def lever_rows(args, ratio: float) -> list[str]:
    lines = []
    for kind in args.kinds:
        for shape in args.shapes:
            d_out, d_in = (int(t) for t in shape.split("x"))
            methods = ("seed", *LEVERS)
            r = synthetic((d_out, d_in), kind, args.tokens, ratio, args.repeats, methods)
            s, e = r["seconds"], r["errors"]
            for m in methods:
                lines.append(f"| {shape} {kind}, ratio {ratio} | {m} | {s[m]:.2f} | {s[m] / s['seed']:.2f} | {e[m]:.5f} "
                             f"| {e[m] / e['seed']:.4f} | {r['iterations'][m] or 20} |")
                print(lines[-1], flush=True)
    return lines


# Where fast mode's time goes (--profile): each stage is the time spent inside these functions.
STAGES = {"statistics (add_batch)": ("layer", "AdmmPruner.add_batch"), "factorisation": ("fast", "factor"),
          "GEMMs": ("fast", "torch.mm"), "mask selection": ("fast", "pruned_set"),
          "elementwise passes": ("fast", "project relax"), "report's traces": ("layer", "quadratic_trace")}


def profile_rows(args, ratio: float) -> list[str]:
    """Fast mode's time split by stage (statistics included), median over repeats."""
    import admm_sparse.layer as layer_module

    modules = {"layer": layer_module, "fast": fast}
    lines = []
    for kind in args.kinds:
        for shape in args.shapes:
            d_out, d_in = (int(t) for t in shape.split("x"))
            x = make_inputs(kind, args.tokens, d_in)
            w0 = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(1)) / math.sqrt(d_in)
            layer = nn.Linear(d_in, d_out, bias=False)
            runs = []
            for _ in range(args.repeats):
                clock = {stage: 0.0 for stage in STAGES}
                patches = []
                for stage, (module, names) in STAGES.items():
                    for name in names.split():
                        owner = modules[module]
                        *path, attr = name.split(".")
                        for part in path:
                            owner = getattr(owner, part)
                        original = getattr(owner, attr)

                        def timed(*a, _f=original, _stage=stage, **kw):
                            start = time.perf_counter()
                            try:
                                return _f(*a, **kw)
                            finally:
                                clock[_stage] += time.perf_counter() - start

                        patches.append((owner, attr, original))
                        setattr(owner, attr, timed)
                try:
                    start = time.perf_counter()
                    run("fast", w0, [x], layer, ratio)
                    total = time.perf_counter() - start
                finally:
                    for owner, attr, original in patches:
                        setattr(owner, attr, original)
                runs.append(dict(clock, total=total, other=total - sum(clock.values())))
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            for stage in (*STAGES, "other"):
                lines.append(f"| {shape} {kind}, ratio {ratio} | {stage} | {med[stage]:.3f} "
                             f"| {100 * med[stage] / med['total']:.0f}% |")
            lines.append(f"| {shape} {kind}, ratio {ratio} | **total** | {med['total']:.3f} | 100% |")
            print("\n".join(lines[-len(STAGES) - 2:]), flush=True)
    return lines


PROFILE_HEADER = ["| layer | stage | seconds | share |", "|---|---|---|---|"]


GROWTH_FIGURE = ROOT / "benchmarks" / "figures" / "fast_growth.png"


def growth_rows(args, ratio: float) -> list[str]:
    """Time against d_in (d_out fixed by --growth-out), 2·d_in calibration tokens each, with a log-log figure."""
    lines, points = [], {m: [] for m in METHODS}
    for d_in in args.growth:
        shape = (args.growth_out, d_in)
        r = synthetic(shape, "correlated", 2 * d_in, ratio, args.repeats)
        lines.append(row(f"{shape[0]}x{d_in} correlated, {2 * d_in} tokens, ratio {ratio}", r))
        print(lines[-1], flush=True)
        for m in METHODS:
            points[m].append((d_in, r["seconds"][m]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m, label in (("seed", "seed mode"), ("fast", "fast mode"), ("sparsegpt", "SparseGPT")):
        ax.loglog(*zip(*points[m]), marker="o", label=label, base=2)
    ax.set_xlabel("d_in (d_out = %d)" % args.growth_out)
    ax.set_ylabel("seconds, one layer")
    ax.set_title(f"Cost growth, ratio {ratio}, {torch.get_num_threads()} thread(s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    GROWTH_FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(GROWTH_FIGURE, dpi=110)
    slopes = []
    for m in METHODS:
        (x0, y0), (x1, y1) = points[m][0], points[m][-1]
        slopes.append(f"{m} {math.log(y1 / y0) / math.log(x1 / x0):.2f}")
    lines.append("")
    lines.append(f"Log-log slope from d_in {points['seed'][0][0]} to {points['seed'][-1][0]}: " + ", ".join(slopes)
                 + f". ![cost growth](figures/{GROWTH_FIGURE.name})")
    return lines


def real_layers(ratio: float, repeats: int, methods=METHODS) -> list[str]:
    """The built-in model's layers of tune_quality.py, inputs captured as there (64 x 512 tokens, error on
    16 held-out windows)."""
    from admm_sparse.builtin import load_builtin
    from benchmarks.quality import _capture_inputs, _heldout_grams
    from benchmarks.tune_quality import LAYERS

    data = load_builtin(num_calib=64, seq_len=512)
    grams = _heldout_grams(data.model, data.heldout, LAYERS, 16, 512)
    inputs = _capture_inputs(data.model, data.calib, LAYERS)
    lines = []
    for name in LAYERS:
        w0 = data.model.get_submodule(name).weight.detach().clone()
        r = compare(w0, inputs.pop(name), grams[name], ratio, repeats, methods)
        lines.append(row(f"`{name}` {w0.shape[0]}x{w0.shape[1]}, ratio {ratio}", r))
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["1024x1024", "2048x2048", "4096x4096"], help="OUTxIN")
    p.add_argument("--kinds", nargs="+", default=["iid", "correlated"], choices=["iid", "correlated"])
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens (as many again are held out)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="the methods compared, synthetic or --real layers (fast and one SparseGPT at least)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--real", action="store_true", help="the built-in model's layers instead of synthetic ones")
    p.add_argument("--levers", action="store_true", help="instead: fast mode with one lever taken away at a "
                   "time, against the seed mode")
    p.add_argument("--profile", action="store_true", help="instead: where fast mode's time goes, by stage")
    p.add_argument("--growth", type=int, nargs="+", metavar="D_IN", help="instead: time against these d_in "
                   "(correlated inputs, 2·d_in tokens each), with a log-log figure")
    p.add_argument("--growth-out", type=int, default=1024, help="d_out of the --growth layers (default 1024)")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md's fast section")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    head = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, fast mode's "
            f"low-precision GEMMs: {str(devices.gemm_dtype(torch.device('cpu'))).removeprefix('torch.')}; "
            f"median of {args.repeats} run(s), methods alternating")
    lines = []
    for ratio in args.ratios:
        if args.levers:
            lines += lever_rows(args, ratio)
            continue
        if args.profile:
            lines += profile_rows(args, ratio)
            continue
        if args.real:
            lines += real_layers(ratio, args.repeats, args.methods)
            continue
        if args.growth:
            lines += growth_rows(args, ratio)
            continue
        for kind in args.kinds:
            for shape in args.shapes:
                d_out, d_in = (int(t) for t in shape.split("x"))
                r = synthetic((d_out, d_in), kind, args.tokens, ratio, args.repeats, args.methods)
                lines.append(row(f"{shape} {kind}, {args.tokens} tokens, ratio {ratio}", r))
                print(lines[-1], flush=True)
    command = "python " + " ".join(["benchmarks/bench_fast.py", *sys.argv[1:]] if argv is None else argv)
    header = LEVER_HEADER if args.levers else PROFILE_HEADER if args.profile else HEADER
    text = "\n".join([f"Command: `{command}`", "", head, "", *header, *lines])
    print(text)
    if args.write:
        old = RESULTS_MD.read_text()
        body = old.split(BEGIN, 1)[1].split(END, 1)[0].strip() if BEGIN in old else "## Fast mode (issue 18)"
        write_section(RESULTS_MD, f"{BEGIN}\n{body}\n\n{text}\n{END}", BEGIN, END)


if __name__ == "__main__":
    main()
