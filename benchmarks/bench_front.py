"""The size–accuracy front: held-out perplexity against the compressed bits per weight of the pruned layers.

Follows benchmarks/BENCHMARKS.md (SmolLM2-135M-Instruct in float32, 64 x 512 calibration windows, perplexity on 100
held-out windows of 512). Each point prunes the whole model with one setting, then measures every pruned layer's
weight as the Atlas export stores it (float16) with admm_sparse.size (zstd, blocks of 16384: bitmap, high bytes,
low bytes), and the perplexity. Each run records the codec setting it was measured with; a run of an earlier
setting is listed apart (its bits compare only with its own setting's) and measured again by the next run of its
point. The settings: the seed mode at sparse_ratio 0.3-0.7 with keep_bits off/3/2/1 and keep_proportion around
0.02, the `best` preset, size budgets (target_bits_per_weight) with the uniform settings of the same size, rounding
by salience (salience_bits) around the size 15% under the default, and the dense model (what compression alone
gives).

    python benchmarks/bench_front.py --write                # every point, in PRIORITY order; resumes
    python benchmarks/bench_front.py --points seed-0.5-kb2  # some points only
    python benchmarks/bench_front.py --table                 # the table and plot from the stored results

Results go to benchmarks/results/front.json as each point ends (a run cut short keeps what it measured).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from admm_sparse.size import CODEC_SETTINGS, DEFAULT_CODEC  # noqa: E402
from benchmarks.results_md import RESULTS_MD, write_section  # noqa: E402

BEGIN, END = "<!-- front:begin -->", "<!-- front:end -->"
JSON_OUT = ROOT / "benchmarks" / "results" / "front.json"
FIGURE = ROOT / "benchmarks" / "figures" / "front.png"
PROTOCOL = dict(calib_windows=64, calib_seq_len=512, eval_windows=100, eval_seq_len=512)
CODEC = CODEC_SETTINGS[DEFAULT_CODEC]
# Runs stored before the codec setting was recorded were measured with zstd level 3's own match length.
EARLIER_CODEC = "zstd level 3"


def is_current(run: dict | None) -> bool:
    """Whether a stored run's sizes were measured with today's codec setting (a run's perplexity does not depend
    on it; its bits do, so the front compares only runs of one setting)."""
    return run is not None and run.get("codec", EARLIER_CODEC) == CODEC


@dataclass(frozen=True)
class Point:
    """One whole-model setting of the front."""

    preset: str  # seed (the original algorithm's options), best (the preset), dense (no pruning)
    ratio: float | None = None
    keep_bits: int | None = 2
    keep_proportion: float = 0.02
    budget: float | None = None  # target_bits_per_weight: the loop picks each layer's ratio and keep bits
    round_in_admm: bool = False  # the rounding with error compensation inside the solver
    salience_bits: float | None = None  # rounding by salience at this level instead of keep_bits' grid

    @property
    def key(self) -> str:
        if self.preset == "dense":
            return "dense"
        what = f"budget{self.budget:g}" if self.budget is not None else f"{self.ratio:g}"
        kb = "" if self.budget is not None else f"-kb{'off' if self.keep_bits is None else self.keep_bits}"
        if self.salience_bits is not None:
            kb, kp = f"-sb{self.salience_bits:g}", ""
        else:
            kp = "" if self.keep_proportion == 0.02 else f"-kp{self.keep_proportion:g}"
        return f"{self.preset}-{what}{kb}{kp}{'-ria' if self.round_in_admm else ''}"

    @property
    def series(self) -> str:
        """The plot's line."""
        if self.preset == "dense":
            return "dense"
        if self.budget is not None:
            return f"{self.preset}, size budget"
        ria = ", rounding in ADMM" if self.round_in_admm else ""
        if self.salience_bits is not None:
            return f"{self.preset}, sparse_ratio {self.ratio:g}, rounding by salience{ria}"
        kp = "" if self.keep_proportion == 0.02 else f", keep_proportion {self.keep_proportion:g}"
        return f"{self.preset}, keep_bits {'off' if self.keep_bits is None else self.keep_bits}{kp}{ria}"

    def config(self):
        from admm_sparse.config import FloatSparseConfig

        options = dict(keep_bits=self.keep_bits, keep_proportion=self.keep_proportion,
                       round_in_admm=self.round_in_admm or None, salience_bits=self.salience_bits)
        if self.budget is not None:
            options = dict(target_bits_per_weight=self.budget)
        else:
            options["sparse_ratio"] = self.ratio
        return FloatSparseConfig.from_preset("best", **options) if self.preset == "best" else FloatSparseConfig(**options)


def _grid(preset, ratios, keep_bits=(2,), **kw):
    return [Point(preset, r, kb, **kw) for kb in keep_bits for r in ratios]


RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7)
# 15% under the original algorithm's default (0.3, keep_bits 2: 4.726 bits per weight measured here).
BUDGET_15 = 4.02
# Rounding by salience (salience_bits) at 0.3: levels around the size 15% under the default.
SALIENCE_LEVELS = (1.0, 1.25, 1.5)
# Every point, most telling first: the seed mode's default rounding across ratios, the dense model, the other
# keep_bits, the size budgets (one at 15% under the default, one at the size of a uniform point), the best preset.
POINTS = (_grid("seed", (0.3, 0.4, 0.5, 0.7)) + [Point("dense")]
          + _grid("seed", (0.3,), (1,)) + _grid("seed", (0.3,), (1,), round_in_admm=True) + _grid("best", (0.3,), (1,))
          + [Point("seed", budget=BUDGET_15), Point("best", budget=BUDGET_15)]
          + _grid("seed", (0.3,), (None, 3)) + _grid("seed", (0.5,), (None, 3, 1)) + _grid("best", (0.3, 0.5))
          + _grid("seed", (0.6,)) + _grid("best", (0.4, 0.7)) + _grid("best", (0.4,), (1,))
          + _grid("seed", (0.7,), (None, 3, 1))
          + _grid("seed", (0.3,), keep_proportion=0.005) + _grid("seed", (0.3,), keep_proportion=0.05)
          + [Point("seed", 0.3, salience_bits=level) for level in SALIENCE_LEVELS]
          + [Point("best", 0.3, salience_bits=level) for level in SALIENCE_LEVELS]
          + [Point(preset, 0.3, salience_bits=level, round_in_admm=True) for level in SALIENCE_LEVELS
             for preset in ("seed", "best")])


def measure_sizes(model, names: list[str]) -> dict:
    """The named layers' weights as float16, compressed (admm_sparse.size): totals and bits per weight."""
    from admm_sparse.size import TensorSize, measure_tensor

    total = TensorSize()
    for name in names:
        total = total + measure_tensor(model.get_submodule(name).weight)
    return total.to_dict()


def run_point(point: Point, data, dense_state, names: list[str]) -> dict:
    from admm_sparse.evaluate import perplexity
    from admm_sparse.pipeline import prune_blocks

    model = data.model
    model.load_state_dict(dense_state)
    start = time.perf_counter()
    extra = {}
    if point.preset != "dense":
        result = prune_blocks(model, data.calib, point.config(), progress=False)
        rows = result.rows
        extra["achieved_sparsity"] = sum(r["sparsity"] * math.prod(r["shape"]) for r in rows) / \
            sum(math.prod(r["shape"]) for r in rows)
        if point.budget is not None:
            extra["budget"] = result.budget
            extra["layer_settings"] = {r["name"]: [round(r["sparsity"], 4), r["keep_bits"], r["keep_proportion"]]
                                       for r in rows}
    prune_s = time.perf_counter() - start
    size = measure_sizes(model, names)
    start = time.perf_counter()
    ppl = perplexity(model, data.heldout, seq_len=PROTOCOL["eval_seq_len"], num_windows=PROTOCOL["eval_windows"],
                     progress=False)
    return dict(point=asdict(point), perplexity=ppl, size=size, codec=CODEC, prune_seconds=prune_s,
                eval_seconds=time.perf_counter() - start, threads=torch.get_num_threads(), **extra)


# ---------------------------------------------------------------- reading

def _interpolate(curve: list[tuple[float, float]], bits: float) -> float | None:
    """The perplexity of a series' polyline at `bits` (log-perplexity linear in bits), None outside it."""
    curve = sorted(curve)
    for (b0, p0), (b1, p1) in zip(curve, curve[1:]):
        if b0 <= bits <= b1:
            t = (bits - b0) / (b1 - b0) if b1 > b0 else 0.0
            return math.exp(math.log(p0) + t * (math.log(p1) - math.log(p0)))
    return None


def current_runs(results: dict) -> dict:
    return {key: run for key, run in results["runs"].items() if is_current(run)}


def render(results: dict, figure_link: str | None) -> str:
    runs = current_runs(results)
    rows = sorted(runs.values(), key=lambda r: (Point(**r["point"]).series, r["size"]["bits_per_weight"]))
    env = results["env"]
    lines = [f"{BEGIN}", "## Size and accuracy: the front (issue 26)", "",
             "Command: `python benchmarks/bench_front.py --write` (BENCHMARKS.md protocol: SmolLM2-135M-Instruct, "
             "64 x 512 calibration windows, 100 x 512 held-out windows; sizes of the pruned layers' weights as float16, "
             f"compressed by admm_sparse.size: {CODEC}, blocks of 16384). torch {env['torch']}, {env['threads']} threads, "
             f"{env['date']}.", "",
             "| setting | sparse_ratio | keep_bits | keep_proportion | bits / weight | bound | vs float16 | perplexity "
             "| prune s |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        p, s = Point(**r["point"]), r["size"]
        ratio = "per layer" if p.budget is not None else "-" if p.ratio is None else f"{p.ratio:g}"
        kb = "per layer" if p.budget is not None else "-" if p.preset == "dense" else \
            f"by salience, {p.salience_bits:g}" if p.salience_bits is not None else \
            "off" if p.keep_bits is None else str(p.keep_bits)
        kp = "per layer" if p.budget is not None else \
            "-" if p.preset == "dense" or p.keep_bits is None or p.salience_bits is not None else f"{p.keep_proportion:g}"
        name = f"{p.preset}, budget {p.budget:g} bits" if p.budget is not None else \
            f"{p.preset}, rounding in ADMM" if p.round_in_admm else p.preset
        lines.append(f"| {name} | {ratio} | {kb} | {kp} | {s['bits_per_weight']:.3f} | {s['bound_bits_per_weight']:.3f} "
                     f"| {s['ratio_to_float16']:.1%} | {r['perplexity']:.2f} | {r['prune_seconds']:.0f}"
                     f"{' *' if r.get('note') else ''} |")
    notes = sorted({r["note"] for r in rows if r.get("note")})
    if notes:
        lines += ["", "\\* " + "; ".join(notes) + "."]
    if figure_link:
        lines += ["", f"![perplexity against compressed bits per weight]({figure_link})"]
    lines += ["", *reading(runs), *earlier_codec(results)]
    lines.append(END)
    return "\n".join(lines)


def earlier_codec(results: dict) -> list[str]:
    """The points measured with an earlier codec setting: re-run ones beside their earlier figures (the codec's
    effect, and whether the perplexity reproduced), the others as they were (their bits compare only with each
    other)."""
    rerun = [r for r in results["runs"].values() if "earlier_codec" in r]
    stale = [r for r in results["runs"].values() if not is_current(r)]
    if not rerun and not stale:
        return []
    out = ["", f"Measured with an earlier codec setting ({EARLIER_CODEC}, its own minimum match length): bits per "
           f"weight then and with {CODEC}; perplexity then and now.", "",
           "| point | bits, earlier codec | bits now | perplexity then | perplexity now |", "|---|---:|---:|---:|---:|"]
    for r in sorted(rerun, key=lambda r: r["earlier_codec"]["bits_per_weight"]):
        e = r["earlier_codec"]
        out.append(f"| `{Point(**r['point']).key}` | {e['bits_per_weight']:.3f} | {r['size']['bits_per_weight']:.3f} "
                   f"| {e['perplexity']:.2f} | {r['perplexity']:.2f} |")
    for r in sorted(stale, key=lambda r: r["size"]["bits_per_weight"]):
        out.append(f"| `{Point(**r['point']).key}` | {r['size']['bits_per_weight']:.3f} | not re-run "
                   f"| {r['perplexity']:.2f} | |")
    return out


def reading(runs: dict) -> list[str]:
    """The comparisons the issue asks for, computed from the stored points of one codec setting."""
    out = []
    default = runs.get("seed-0.3-kb2")
    if default:
        bits0, ppl0 = default["size"]["bits_per_weight"], default["perplexity"]
        better = sorted((r for r in runs.values() if r["perplexity"] <= ppl0 and r["point"]["preset"] != "dense"),
                        key=lambda r: r["size"]["bits_per_weight"])
        if better:
            b = better[0]
            out.append(f"- Against the original algorithm's default (0.3, 2 keep bits: {bits0:.3f} bits per weight, "
                       f"perplexity {ppl0:.2f}), the smallest point at equal or lower perplexity is "
                       f"`{Point(**b['point']).key}`: {b['size']['bits_per_weight']:.3f} bits per weight "
                       f"({1 - b['size']['bits_per_weight'] / bits0:.1%} fewer bytes), perplexity {b['perplexity']:.2f}.")
        smaller = sorted((r for r in runs.values() if r["size"]["bits_per_weight"] <= 0.85 * bits0),
                         key=lambda r: r["perplexity"])
        if smaller:
            b = smaller[0]
            out.append(f"- The most accurate point with at least 15% fewer bytes than that default: "
                       f"`{Point(**b['point']).key}`, {b['size']['bits_per_weight']:.3f} bits per weight "
                       f"({1 - b['size']['bits_per_weight'] / bits0:.1%} fewer bytes), perplexity {b['perplexity']:.2f} "
                       f"({b['perplexity'] / ppl0 - 1:+.1%}).")
    seed = [(r["size"]["bits_per_weight"], r["perplexity"]) for r in runs.values() if _default_rounding(r, "seed")]
    best = sorted((r for r in runs.values() if _default_rounding(r, "best")), key=lambda r: r["size"]["bits_per_weight"])
    if seed and best:
        cells = []
        for r in best:
            at = _interpolate(seed, r["size"]["bits_per_weight"])
            cells.append(f"{r['size']['bits_per_weight']:.2f} bits: best {r['perplexity']:.2f} against seed "
                         f"{'(outside the seed curve)' if at is None else f'{at:.2f}'}")
        out.append("- The best preset against the seed mode's curve (keep_bits 2, the seed's perplexity interpolated "
                   "at the best point's size, log-linear between its two neighbours): " + "; ".join(cells) + ".")
    seeds = sorted((r for r in runs.values() if r["point"]["preset"] == "seed" and r["point"]["budget"] is None),
                   key=lambda r: r["size"]["bits_per_weight"])
    bests = [r for r in runs.values() if r["point"]["preset"] == "best"]
    if seeds and bests:  # the best preset's front below the seed mode's: is every seed point beaten at its size?
        cells = []
        for s in seeds:
            beating = [b for b in bests if b["size"]["bits_per_weight"] <= s["size"]["bits_per_weight"]
                       and b["perplexity"] < s["perplexity"]]
            b = min(beating, key=lambda b: b["perplexity"]) if beating else None
            best_cell = "none" if b is None else \
                f"`{Point(**b['point']).key}` ({b['size']['bits_per_weight']:.3f} bits, {b['perplexity']:.2f})"
            cells.append(f"`{Point(**s['point']).key}` ({s['size']['bits_per_weight']:.3f} bits, "
                         f"{s['perplexity']:.2f}): {best_cell}")
        out.append(f"- Every seed-mode point against the best preset's most accurate point of at most its size "
                   f"({sum(c.endswith('none') for c in cells)} of {len(cells)} without one): " + "; ".join(cells) + ".")
    for a in runs.values():  # the same setting in seed mode and the best preset
        if a["point"]["preset"] != "seed":
            continue
        twin = runs.get(Point(**{**a["point"], "preset": "best"}).key)
        if twin:
            out.append(f"- `{Point(**a['point']).key}` against the best preset with the same setting: "
                       f"{a['size']['bits_per_weight']:.3f} bits, perplexity {a['perplexity']:.2f}; best "
                       f"{twin['size']['bits_per_weight']:.3f} bits, perplexity {twin['perplexity']:.2f}.")
    for r in sorted((r for r in runs.values() if r["point"]["budget"] is not None), key=lambda r: r["point"]["preset"]):
        p, bits = Point(**r["point"]), r["size"]["bits_per_weight"]
        uniform = [(u["size"]["bits_per_weight"], u["perplexity"]) for u in runs.values()
                   if _default_rounding(u, p.preset)]
        at = _interpolate(uniform, bits)
        kinds = sorted({(kb, kp) for _, kb, kp in r["layer_settings"].values()}, key=str)
        out.append(f"- Size budget {p.budget:g} bits per weight, {p.preset}: predicted by the probe pass "
                   f"{r['budget']['predicted_bits_per_weight']:.3f}, measured {bits:.3f} ({bits / p.budget - 1:+.2%} of "
                   f"the budget), perplexity {r['perplexity']:.2f}, against {p.preset} with uniform settings (keep_bits "
                   f"2) at the same size {'(outside its measured curve)' if at is None else f'{at:.2f}'}; "
                   f"sparsity {r['achieved_sparsity']:.3f}, roundings used (keep_bits, keep_proportion): "
                   + ", ".join(f"{kb}/{kp:g}" if kb is not None else "off" for kb, kp in kinds) + ".")
    return out


def _default_rounding(run: dict, preset: str) -> bool:
    """A uniform point of `preset` with the SPEC's default rounding (keep_bits 2, keep_proportion 0.02)."""
    p = Point(**run["point"])
    return (p.preset == preset and p.budget is None and p.salience_bits is None and not p.round_in_admm
            and p.keep_bits == 2 and p.keep_proportion == 0.02)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list] = {}
    for r in current_runs(results).values():
        series.setdefault(Point(**r["point"]).series, []).append((r["size"]["bits_per_weight"], r["perplexity"]))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # more series than tab10's colours
    for name, pts in sorted(series.items()):
        pts.sort()
        single = len(pts) == 1
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="*" if name == "dense" else "o",
                ls="none" if single else "-", label=name, ms=10 if name == "dense" else 5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compressed bits per weight of the pruned layers (float16, zstd blocks; log scale)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("SmolLM2-135M: size against accuracy (BENCHMARKS.md protocol)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", help="comma-separated keys (default: every point not measured yet)")
    p.add_argument("--redo", action="store_true", help="measure the --points again")
    p.add_argument("--table", action="store_true", help="only the table and plot from the stored results")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=JSON_OUT)
    p.add_argument("--write", action="store_true", help=f"write the section of {RESULTS_MD.name} and the plot")
    args = p.parse_args(argv)
    by_key = {pt.key: pt for pt in POINTS}
    results = json.loads(args.json.read_text()) if args.json.exists() else dict(protocol=PROTOCOL, runs={})
    if not args.table:
        if args.points:
            unknown = [k for k in args.points.split(",") if k not in by_key]
            if unknown:
                p.error(f"unknown point(s) {unknown}; known: {', '.join(by_key)}")
            todo = [by_key[k] for k in args.points.split(",")]
        else:
            todo = list(POINTS)
        todo = [pt for pt in todo if args.redo or not is_current(results["runs"].get(pt.key))]
        import transformers

        from admm_sparse.builtin import load_builtin
        from admm_sparse.plan import make_plan
        from admm_sparse.config import FloatSparseConfig

        torch.set_num_threads(args.threads)
        results["env"] = dict(torch=torch.__version__, transformers=transformers.__version__,
                              threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
                              date=time.strftime("%Y-%m-%d"))
        data = load_builtin(num_calib=PROTOCOL["calib_windows"], seq_len=PROTOCOL["calib_seq_len"])
        dense_state = {k: v.clone() for k, v in data.model.state_dict().items()}
        names = sorted(make_plan(data.model, FloatSparseConfig()).targets)
        for pt in todo:
            before = results["runs"].get(pt.key)
            r = results["runs"][pt.key] = run_point(pt, data, dense_state, names)
            if before is not None and not is_current(before):  # keep what the earlier codec measured
                r["earlier_codec"] = dict(codec=before.get("codec", EARLIER_CODEC), perplexity=before["perplexity"],
                                          bits_per_weight=before["size"]["bits_per_weight"])
            print(f"{pt.key}: {r['size']['bits_per_weight']:.3f} bits/weight, perplexity {r['perplexity']:.2f}, "
                  f"prune {r['prune_seconds']:.0f} s", flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(args.json)
    if args.write:
        plot(results, FIGURE)
        link = Path(os.path.relpath(FIGURE, RESULTS_MD.parent)).as_posix()
        write_section(RESULTS_MD, render(results, link), BEGIN, END)
        print(f"wrote {RESULTS_MD} and {FIGURE}")
    else:
        print(render(results, None))
    return results


if __name__ == "__main__":
    main()
