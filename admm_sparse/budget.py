"""A size budget (config `target_bits_per_weight`): each layer's sparse_ratio and keep-bit rounding (keep_bits and
keep_proportion) chosen so that the pruned layers' compressed size (admm_sparse.size, what the Atlas card stores)
meets a target, at the least error.

1. A probe pass (the block loop with the weights left dense, as the error-driven allocation's) measures, for every
   layer, each setting of a grid: the layer pruned by fast mode at each ratio of RATIOS, then keep-bit rounded at
   each keep_bits of KEEP_BITS (off: the float16 weight as it is) with each keep_proportion of KEEP_PROPORTIONS:
   the relative output error on the layer's calibration inputs, and the compressed bytes of the float16 weight as
   the export stores it (SizeProbe). Which weights keep their whole mantissa stays the rounding's own choice (the
   largest rounding errors, weighted by their input channel's RMS): each kept weight costs about the same bytes
   (its low byte), so the most error per byte is also the most error; how many, per layer, is the budget's.
2. choose() picks one setting per layer minimising the layers' squared relative errors summed with each layer's
   number of weights as its weight (as admm_sparse.allocation, where that weighting measured best), with the
   bytes at most the budget: a greedy over each layer's lower convex hull of (bytes, error) points, the most error
   saved per byte first, from every layer's smallest setting up; a step that does not fit is skipped with the rest
   of its layer's hull. The total ends below the budget by less than one layer's step, a fraction of a percent of
   a model's bytes when there are more than a few dozen layers.

The final run prunes each layer at its chosen ratio and rounds it as chosen, in the config's mode,
on the pruned model's inputs: its measured size (the report's) differs from the probe's prediction by what the
final weights compress differently from the probe's (benchmarks/RESULTS.md measures it).
"""
from __future__ import annotations

import math
import time

import torch

from .allocation import lower_hull
from .keepbits import apply_keepbits
from .layer import AdmmPruner, quadratic_trace
from .size import compressed_bytes

RATIOS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
KEEP_BITS = (None, 3, 2, 1)
KEEP_PROPORTIONS = (0.0, 0.02, 0.05)  # around SPEC §3's 0.02


class SizeProbe(AdmmPruner):
    """A layer's pruner for the probe pass: fasterprune measures every (ratio, keep_bits, keep_proportion) setting
    of the grid, puts the dense weight back, and reports them as "settings": [ratio, keep_bits, keep_proportion,
    relative error, compressed bytes]."""

    def fasterprune(self, sparse_ratio: float | None = None, **options) -> dict:
        start = time.perf_counter()
        weight = self.layer.weight
        dense = weight.detach().clone()
        dense32 = dense.float()
        lower = self.H  # only its lower triangle is defined
        h = lower.tril().add_(lower.tril(-1).T)  # the whole symmetric H, once per layer
        diag = lower.diagonal()
        energy = quadratic_trace(lower, dense32)
        settings = []
        for ratio in RATIOS:
            if ratio == 0:
                pruned = dense32
            else:
                super().fasterprune(ratio, **options)
                pruned = weight.detach().float().clone()
                weight.data.copy_(dense)
            # The error of pruned + rounding r: ||Δ + r||²_H = ||Δ||²_H + 2<ΔH, r> + ||r||²_H, Δ = pruned - dense. The
            # first two are exact from one GEMM per ratio; the last is taken on H's diagonal (rounding errors of
            # different weights are uncorrelated): within 0.1% of the exact error (tests/test_budget.py), one GEMM per
            # setting less.
            pruning = pruned - dense32
            pruning_h = pruning @ h
            pruned_moved = float((pruning_h * pruning).sum(dtype=torch.float64))
            for keep_bits, keep_proportion in rounding_grid():
                stored = (pruned if keep_bits is None else
                          apply_keepbits(pruned, self.scaler, keep_bits, keep_proportion)).to(torch.float16)
                rounding = stored.float() - pruned
                moved = pruned_moved + float(2 * (pruning_h * rounding).sum(dtype=torch.float64)
                                             + (rounding.square() * diag).sum(dtype=torch.float64))
                error = math.sqrt(max(moved, 0.0) / energy) if energy > 0 else 0.0
                settings.append([ratio, keep_bits, keep_proportion, error, compressed_bytes(stored)])
        return dict(shape=(self.rows, self.columns), sparsity=0.0, relative_error=0.0, settings=settings,
                    seconds=time.perf_counter() - start)


def rounding_grid() -> list[tuple[int | None, float]]:
    """The (keep_bits, keep_proportion) settings measured; no rounding has no proportion (0)."""
    return [(None, 0.0)] + [(kb, kp) for kb in KEEP_BITS if kb is not None for kp in KEEP_PROPORTIONS]


def _hull(points: list[tuple]) -> list[tuple]:
    """The settings worth having from (bytes, cost, ...) points: more bytes only for less error (the Pareto front),
    then its lower convex hull."""
    front: list[tuple] = []
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or p[1] < front[-1][1]:
            front.append(p)
    return lower_hull(front)


def choose(shapes: dict[str, tuple[int, int]], settings: dict[str, list], target_bits_per_weight: float
           ) -> tuple[dict[str, tuple[float, int | None, float]], int]:
    """Each layer's (ratio, keep_bits, keep_proportion) and the predicted total bytes: see the module docstring. shapes: every
    measured layer's [out, in]; settings: SizeProbe's rows by layer name. The budget counts those layers' weights."""
    budget = target_bits_per_weight * sum(math.prod(shapes[n]) for n in settings) / 8
    chosen, steps = {}, []
    for order, (name, rows) in enumerate(settings.items()):
        numel = math.prod(shapes[name])
        hull = _hull([(nbytes, numel * error * error, ratio, kb, kp) for ratio, kb, kp, error, nbytes in rows])
        chosen[name] = hull[0]
        steps += [((a[1] - b[1]) / (b[0] - a[0]), order, name, a, b) for a, b in zip(hull, hull[1:])]
    total = sum(p[0] for p in chosen.values())
    if total > budget:
        smallest = 8 * total / sum(math.prod(shapes[n]) for n in settings)
        raise ValueError(f"target_bits_per_weight {target_bits_per_weight:g} is below the smallest size the settings "
                         f"reach ({smallest:.3f} bits per weight: each layer at its smallest, up to sparse_ratio "
                         f"{max(RATIOS):g} with keep_bits {min(k for k in KEEP_BITS if k is not None)}); raise it")
    blocked = set()
    for _, _, name, a, b in sorted(steps, key=lambda s: (-s[0], s[1])):  # stable: a layer's steps stay in order
        if name in blocked:
            continue
        if total + b[0] - a[0] > budget:
            blocked.add(name)  # its later steps need this one
            continue
        chosen[name] = b
        total += b[0] - a[0]
    return {name: p[2:] for name, p in chosen.items()}, int(total)
