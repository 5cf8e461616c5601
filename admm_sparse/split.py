"""One layer's seed-mode ADMM split over the ranks of a group by its output rows (torch.distributed).

On N GPUs a block waits for its largest layer's ADMM (down_proj): whole layers cannot be balanced past ~2 ranks.
In the normalised space the iterate Wn = (W d)ᵀ is d_in x d_out, and each output row of W is a column of Wn: the
GEMM Wn = Hinv (B + rho (Z - U)) and the projection are column-independent, so each rank iterates its own
contiguous slice of columns, with the whole Hinv (every rank holds the summed statistics). Only the selection is
coupled: the unstructured k smallest |V| are chosen over the whole matrix by a radix select whose histograms are
summed over the ranks between its sweeps (`global_smallest`), with ties going to the lower flat index of Wn as in
the native select. Per-row and N:M masks are row-local and need no communication. At the end each rank
broadcasts its rows, so every rank holds the whole pruned weight.

The loop performs the SPEC's float32 operations (as admm_sparse.reference); one process runs the native op, so
the two agree to float32 rounding, not bit for bit: a column slice's GEMM may round differently from the whole.
"""
from __future__ import annotations

import torch

from . import _ops, generic, reference

# Radix select: 31 bits of |V|'s float pattern (the sign is 0), in sweeps of these digit widths, high bits first.
DIGITS = (8, 8, 8, 7)


def column_slices(d_out: int, ranks: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) columns of Wn (output rows of W) per rank, sizes differing by at most one."""
    bounds = [d_out * r // ranks for r in range(ranks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def global_smallest(values: torch.Tensor, k: int, group) -> torch.Tensor:
    """The pruned set (True) of this rank's slice `values` of a matrix whose columns are split over the group's
    ranks in order (column_slices): the k smallest |values| over the whole matrix, ties to the lower flat
    (row-major) index, exactly as prune_mask on the gathered matrix. Each sweep of the radix select sums its
    histogram over the ranks (at most 256 counts), then the ties are placed by their count per row."""
    total = torch.tensor(values.numel(), dtype=torch.int64)
    if k == 0 or k >= int(group.sum(total)):
        return torch.full(values.shape, k > 0, dtype=torch.bool, device=values.device)
    bits = values.abs().contiguous().view(torch.int32)
    prefix, position = 0, k - 1  # the k-th smallest's place among the candidates left
    candidates = torch.ones_like(bits, dtype=torch.bool)
    shift = 31
    for width_bits in DIGITS:
        shift -= width_bits
        digit = (bits >> shift) & ((1 << width_bits) - 1)
        counts = torch.bincount(digit[candidates], minlength=1 << width_bits).to(torch.int64)
        group.sum(counts)
        below = torch.cumsum(counts, 0)
        chosen = int(torch.searchsorted(below, torch.tensor(position, dtype=torch.int64), right=True))
        position -= int(below[chosen - 1]) if chosen > 0 else 0
        prefix = (prefix << width_bits) | chosen
        candidates &= digit == chosen
    threshold, take = prefix, position + 1  # the k-th smallest |value|'s bit pattern, and how many of its ties
    pruned = bits < threshold
    ties = bits == threshold
    # Ties in flat order: row by row, and in each row the ranks' slices left to right.
    per_row = torch.zeros(group.size, values.shape[0], dtype=torch.int64, device=values.device)
    per_row[group.rank] = ties.sum(1)
    group.sum(per_row)
    before = torch.cumsum(per_row.T.reshape(-1), 0) - per_row.T.reshape(-1)  # ties ahead of (row, rank)
    ahead = before.view(values.shape[0], group.size)[:, group.rank]
    order = ahead[:, None] + torch.cumsum(ties.to(torch.int64), 1) - 1  # each tie's place among all ties
    return pruned | (ties & (order < take))


def admm_prune_split(hessian: torch.Tensor, weight: torch.Tensor, k: int, percdamp: float, rho: float, iters: int,
                     prune_iters: int, structure: str, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_ops.admm_prune's result (the whole pruned float32 weight on every rank, dampings, dense output energy),
    each rank iterating its slice of the output rows; `hessian` (lower triangle) and `weight` are the same on
    every rank."""
    d_out, d_in = weight.shape
    start, end = column_slices(d_out, group.size)[group.rank]
    d, hn, damping = generic.normalised(hessian, percdamp)
    hinv, used = _ops.damped_cholesky_inverse(hn, rho)
    wn = (weight[start:end].float() * d).T.contiguous()
    b = hn @ wn
    del hn
    energy = torch.stack([(wn * b).sum(dtype=torch.float64), (wn * wn).sum(dtype=torch.float64)])
    group.sum(energy)  # the whole weight's tr(W H Wᵀ), from every rank's rows
    u = torch.zeros_like(wn)
    keep = torch.ones_like(wn)
    for it in range(iters):
        v = wn + u
        if it < prune_iters:
            pruned = global_smallest(v, k, group) if structure == "unstructured" else \
                reference.structured_mask(v.T, k * (end - start) // d_out, structure).T
            keep = (~pruned).float()
        z = v * keep
        u = v - z
        wn = hinv @ (b + rho * (z - u))
    out = torch.empty(d_out, d_in, dtype=torch.float32, device=weight.device)
    out[start:end] = ((wn + u) * keep).T / d
    for rank, (a, e) in enumerate(column_slices(d_out, group.size)):  # every rank ends with every row
        rows = out[a:e].contiguous()
        group.broadcast(rows, rank)
        out[a:e] = rows
    dampings = torch.tensor([damping, float(used) - float(torch.tensor(rho, dtype=used.dtype))], device=weight.device)
    return out, dampings, (energy[0] - damping * energy[1]).float()
