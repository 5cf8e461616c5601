"""Sparsity allocation by measured error (config `allocation: error`).

`sparse_ratio` stays the fraction of all selected weights that is pruned, but each layer gets its own share:
1. a probe pass through the model (the same block loop, weights left dense) measures every layer's relative
   output error ||X (W' - W)ᵀ|| / ||X Wᵀ|| on its calibration inputs at a grid of ratios around the global one
   (grid(): ±0.15 in steps of 0.05), pruned by fast mode (the seed's error at a fraction of its time; ErrorProbe);
2. allocate() picks each layer's count of zeros minimising Σ numel · (relative error)², with the total
   exactly the uniform allocation's: the greedy over each error curve's lower convex hull, cheapest error per
   pruned weight first, the last segment cut to the exact remainder. Weighting by size was the best of three
   objectives measured (benchmarks/bench_allocation.py, RESULTS.md): unweighted, a small layer (k_proj, v_proj)
   weighs as much as a large one; weighted by output energy, the first blocks (small outputs) go to 0.8 and beyond.
Only for unstructured masks: N:M and per_row fix every row's count by definition.
"""
from __future__ import annotations

import time

from .layer import AdmmPruner, pruned_count, quadratic_trace

STEPS = (-0.15, -0.10, -0.05, 0.0, 0.05, 0.10, 0.15)
MAX_RATIO = 0.95  # no layer is pushed further than this, whatever the global ratio


def grid(sparse_ratio: float) -> list[float]:
    """The ratios each layer's error is measured at: the global ratio and steps around it, within [0, 0.95]."""
    return sorted({min(max(round(sparse_ratio + s, 6), 0.0), max(MAX_RATIO, sparse_ratio)) for s in STEPS})


class ErrorProbe(AdmmPruner):
    """A layer's pruner for the probe pass: fasterprune measures the relative output error at each ratio of
    the grid, puts the dense weight back, and reports the errors (as "errors", in grid order)."""

    def __init__(self, layer, ratios: list[float], **options):
        super().__init__(layer, **options)
        self.ratios = ratios

    def fasterprune(self, sparse_ratio: float | None = None, **options) -> dict:
        start = time.perf_counter()
        weight = self.layer.weight
        dense = weight.detach().clone()
        errors = []
        for ratio in self.ratios:
            if ratio == 0:
                errors.append(0.0)
                continue
            errors.append(super().fasterprune(ratio, **options).relative_error)
            weight.data.copy_(dense)
        return dict(shape=(self.rows, self.columns), sparsity=0.0, relative_error=0.0, errors=errors,
                    output_energy=quadratic_trace(self.H, dense.float()) / self.tokens,  # per token
                    seconds=time.perf_counter() - start)


def lower_hull(points: list[tuple]) -> list[tuple]:
    """The lower convex hull of (x, y, ...) points sorted by x (monotone chain); the rest of a point rides along."""
    hull: list[tuple] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2][:2], hull[-1][:2]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # hull[-1] on or above the chord: drop it
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(shapes: dict[str, tuple[int, int]], errors: dict[str, list[float]], ratios: list[float],
             sparse_ratio: float, weights: dict[str, float] | None = None) -> dict[str, int]:
    """Each layer's number of pruned weights: in total exactly what `sparse_ratio` prunes layer by layer
    (sum of int(numel · sparse_ratio)), spread to minimise the layers' squared relative errors summed with
    each layer's number of weights as its weight (or `weights`, by name: benchmarks/bench_allocation.py compares).

    shapes: every selected layer's [out, in]; errors: the layers' measured relative errors at `ratios` (a layer
    without measurements, e.g. one no calibration token reached, keeps the uniform count)."""
    counts = {name: pruned_count(shape, sparse_ratio, "unstructured") for name, shape in shapes.items()}
    segments = []  # (error added per pruned weight, layer order, pruned weights it adds)
    for order, (name, errs) in enumerate((n, e) for n, e in errors.items() if n in shapes):
        numel = shapes[name][0] * shapes[name][1]
        weight = numel if weights is None else weights[name]
        points = sorted({pruned_count(shapes[name], r, "unstructured"): weight * e * e
                         for r, e in zip(ratios, errs)}.items())
        hull = lower_hull(points)
        counts[name] = hull[0][0]
        for (x1, y1), (x2, y2) in zip(hull, hull[1:]):
            segments.append(((y2 - y1) / (x2 - x1), order, name, x2 - x1))
        if not hull[0][0] <= pruned_count(shapes[name], sparse_ratio, "unstructured") <= hull[-1][0] <= numel:
            raise ValueError(f"{name}: the error grid {ratios} does not bracket sparse_ratio {sparse_ratio}")
    need = sum(pruned_count(shape, sparse_ratio, "unstructured") for shape in shapes.values()) - sum(counts.values())
    # Convex curves: each layer's segments come in increasing slope, so the global order keeps each layer's own.
    for _, _, name, width in sorted(segments):
        if need <= 0:
            break
        take = min(width, need)
        counts[name] += take
        need -= take
    return counts


def ratio_for_count(shape: tuple[int, int], count: int) -> float:
    """A sparse_ratio that prunes exactly `count` of the layer's weights (pruned_count floors numel · ratio:
    half a weight above the count is safe from float rounding either way)."""
    return (count + 0.5) / (shape[0] * shape[1])


def check_total(shapes: dict[str, tuple[int, int]], ratios: dict[str, float], sparse_ratio: float) -> None:
    """The allocation prunes exactly the uniform allocation's count (a bug here would change the model's size)."""
    got = sum(pruned_count(shapes[n], r, "unstructured") for n, r in ratios.items())
    want = sum(pruned_count(shape, sparse_ratio, "unstructured") for shape in shapes.values())
    if got != want:
        raise AssertionError(f"allocation prunes {got} weights, not {want}")


def allocated_ratios(shapes: dict[str, tuple[int, int]], rows: list[dict], ratios: list[float],
                     sparse_ratio: float, weights: dict[str, float] | None = None) -> dict[str, float]:
    """Each layer's sparse_ratio from the probe pass's report rows (ErrorProbe's "errors"); weights: see allocate."""
    errors = {row["name"]: row["errors"] for row in rows if "errors" in row}
    counts = allocate(shapes, errors, ratios, sparse_ratio, weights)
    result = {name: ratio_for_count(shapes[name], count) for name, count in counts.items()}
    check_total(shapes, result, sparse_ratio)
    return result
