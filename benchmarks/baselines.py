"""Baseline pruners for the quality benchmark: magnitude, Wanda and SparseGPT.

Written from the papers (not from their code):

- Magnitude: remove the weights of smallest |W| in the layer (one threshold per layer).
- Wanda, Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models":
  score S_ij = |W_ij| * ||X_j||_2 (the j-th input feature's norm over all calibration tokens),
  compared within each output row; no weight update.
- SparseGPT, Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
  in One-Shot", Algorithm 1: columns are pruned left to right with the OBS update, the rows of the
  upper Cholesky factor of H^-1 giving each step's update; updates are applied lazily in blocks of
  128 columns; the mask is chosen adaptively for 128 columns at a time by w^2 / [chol(H^-1)]_cc^2;
  damping 0.01 * mean(diag(H)).

Each method has an N:M variant (n zeros in every group of m consecutive input weights of a row).

Every pruner follows the protocol of admm_sparse.layer.AdmmPruner, so the whole-model pipeline can
use it: ``p = Pruner(layer); p.add_batch(inp) ...; report = p.fasterprune(ratio); p.free()``.
All of them accumulate H = sum X^T X, so that every method's relative output error is measured the
same way (Wanda's ||X_j||_2 is sqrt(diag H)).

These are benchmark baselines, not part of the library's API.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from admm_sparse import _ops

__all__ = [
    "PruneReport",
    "smallest_mask",
    "row_smallest_mask",
    "nm_mask",
    "magnitude_prune",
    "wanda_prune",
    "sparsegpt_prune",
    "relative_output_error",
    "MagnitudePruner",
    "WandaPruner",
    "SparseGPTPruner",
]


@dataclass
class PruneReport:
    sparsity: float  # fraction of exact zeros in the new weight
    relative_error: float  # ||(W - W') X^T||_F / ||W X^T||_F on the calibration inputs
    seconds: float  # time of fasterprune
    damping: float  # added to diag(H) (SparseGPT only; 0 otherwise)
    tokens: int  # calibration tokens seen
    shape: tuple  # (d_out, d_in)


# --- masks (True = pruned). Ties go to the lower flat index, so results are deterministic. ---


def smallest_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k smallest entries of `score` over the whole tensor: those below the k-th smallest value,
    then as many entries equal to it as are still needed (a selection, not a sort: ~8x faster)."""
    flat = score.flatten()
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    kth = flat.kthvalue(k).values
    mask = flat < kth
    ties = (flat == kth).nonzero().flatten()
    mask[ties[: k - int(mask.sum())]] = True
    return mask.view_as(score)


def row_smallest_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k smallest entries of each row of a 2-D `score`."""
    order = torch.sort(score, dim=1, stable=True).indices
    mask = torch.zeros_like(score, dtype=torch.bool)
    return mask.scatter_(1, order[:, :k], True)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the n smallest entries in every group of m consecutive columns of each row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M needs the number of columns ({cols}) to be a multiple of m={m}")
    groups = score.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, order[..., :n], True)
    return mask.reshape(rows, cols)


def _check_nm(n: int, m: int) -> None:
    if (n == 0) != (m == 0) or not 0 <= n <= m:
        raise ValueError(f"bad N:M pattern {n}:{m}")


# --- the methods as plain functions of (W, statistics); they return a new tensor ---


def magnitude_prune(W: torch.Tensor, sparsity: float = 0.0, n: int = 0, m: int = 0) -> torch.Tensor:
    """Zero the int(numel * sparsity) weights of smallest |W| in the whole matrix, or n in each m."""
    _check_nm(n, m)
    score = W.abs()
    mask = nm_mask(score, n, m) if m else smallest_mask(score, int(W.numel() * sparsity))
    return W.masked_fill(mask, 0)


def wanda_prune(
    W: torch.Tensor, col_norm: torch.Tensor, sparsity: float = 0.0, n: int = 0, m: int = 0
) -> torch.Tensor:
    """Wanda: zero, in each row, the int(d_in * sparsity) weights of smallest |W_ij| * ||X_j||_2."""
    _check_nm(n, m)
    score = W.abs() * col_norm.to(W.dtype)[None, :]
    mask = nm_mask(score, n, m) if m else row_smallest_mask(score, int(W.shape[1] * sparsity))
    return W.masked_fill(mask, 0)


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.0,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    mask_blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, float]:
    """SparseGPT (Algorithm 1 of the paper). Works in the dtype of W; returns (new W, damping added).

    Unstructured: exactly int(numel * sparsity) zeros, spread over the mask blocks of `mask_blocksize`
    columns in proportion to their width (the paper prunes the same fraction of every block).
    N:M: the mask of each group of m columns is chosen when the sweep reaches it.

    As fast as the algorithm allows on a CPU (benchmarks/bench_fast.py checks it against a plain transcription
    of Algorithm 1): U from one factorisation, the sweep on Wᵀ (contiguous rows), the per-column steps on one
    thread and the lazy GEMMs and factorisations on all, masks by selection instead of sorting.
    """
    _check_nm(n, m)
    if not (blocksize % mask_blocksize == 0 or mask_blocksize % blocksize == 0):
        # Mask selection must see columns that already carry every earlier column's update.
        raise ValueError("blocksize and mask_blocksize must divide one another")
    if m and blocksize % m:
        raise ValueError("blocksize must be a multiple of m")
    W = W.clone()
    H = H.to(W.dtype).clone()
    d_out, d_in = W.shape

    # Inputs that never fire carry no information: their weights are dropped, H made invertible.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.diag(H).mean().item()
    H.diagonal().add_(damp)
    # Row j of U (H^-1 = U^T U) is the inverse Hessian row of the OBS step at column j, over the
    # columns j.. still to be pruned, scaled by 1/sqrt of its diagonal: no re-inversion per column.
    # U without forming H^-1: H = R Rᵀ with R upper (the Cholesky factor of H with rows and columns
    # reversed, reversed back), so H^-1 = R^-ᵀ R^-1 and U = R^-1 (the Cholesky factor is unique). One
    # factorisation and one triangular solve instead of the Cholesky, inverse and Cholesky of the paper
    # (measured 1.4-2x faster at 2048; cholesky_inverse is also slow on 2 CPU threads, torch 2.13).
    R = torch.linalg.cholesky(H.flip(0, 1)).flip(0, 1)
    U = torch.linalg.solve_triangular(R, torch.eye(d_in, dtype=H.dtype, device=H.device), upper=True)

    k_total = int(d_out * d_in * sparsity)
    # The sweep works on Wᵀ: each column of W is then a contiguous row, and its update a contiguous block.
    Wt = W.T.contiguous()
    mask_t = torch.zeros_like(Wt, dtype=torch.bool)  # True = pruned
    _sweep(Wt, U, mask_t, k_total, n, m, blocksize, mask_blocksize)
    return Wt.masked_fill_(mask_t, 0).T.contiguous(), damp


@contextmanager
def _single_thread():
    # The per-column steps are small ops (one row of d_out): on one thread they do not wait for a second
    # one (on a busy 2-core CPU, two threads measured 29 s against 1.3 s for a 576x1536 layer).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sweep(Wt, U, mask_t, k_total, n, m, blocksize, mask_blocksize):
    """Algorithm 1's column sweep, in place on Wt = Wᵀ and mask_t = maskᵀ (row j: column j of W). The
    per-column steps run on one thread; each block's lazy update of all later columns (a GEMM) on all."""
    d_in = Wt.shape[0]
    diag = torch.diag(U)
    scale = torch.empty_like(Wt)  # mask / U_jj: each column's error is then one product
    step = m if m else mask_blocksize
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        W1 = Wt[i1:i2]  # a view: the eager updates inside the block land in Wt
        Err = torch.empty_like(W1)
        with _single_thread():
            for j in range(i1, i2):
                if j % step == 0:
                    e = min(j + step, d_in)
                    score = (Wt[j:e] ** 2 / diag[j:e, None] ** 2).T  # W's layout: the masks' tie order
                    if m:
                        mask_t[j:e] = nm_mask(score, n, m).T
                    else:
                        k = k_total * e // d_in - k_total * j // d_in  # sums to k_total over the blocks
                        mask_t[j:e] = smallest_mask(score, k).T
                    torch.div(mask_t[j:e], diag[j:e, None], out=scale[j:e])
                c = j - i1
                err = torch.mul(W1[c], scale[j], out=Err[c])
                W1[c:].addr_(U[j, j:i2], err, alpha=-1)
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err, alpha=-1)  # the lazy update of all later columns


def relative_output_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """||(W - W_new) X^T||_F / ||W X^T||_F, from H = sum X^T X, in float64."""
    H = H.double()
    W = W.double()
    D = W - W_new.double()
    num = ((D @ H) * D).sum()
    den = ((W @ H) * W).sum()
    return (num.clamp_min(0) / den).sqrt().item() if den > 0 else 0.0


# --- pruners with the add_batch / fasterprune / free protocol ---


class _HessianPruner:
    """Collects H = sum X^T X (float64 sums, read in float32) over one nn.Linear's calibration inputs, with the
    library's own statistics kernel (admm_sparse's accumulate_sums: the lower triangle only, half the GEMM), so
    that the baselines' statistics cost what ADMM's do."""

    name = "base"

    def __init__(self, layer: nn.Linear, prune_n: int = 0, prune_m: int = 0):
        _check_nm(prune_n, prune_m)
        self.layer = layer
        self.prune_n, self.prune_m = prune_n, prune_m
        d_in = layer.weight.shape[1]
        device = layer.weight.device
        # H's lower triangle and the channels' squares as the ADMM pruner sums them (float64 sums of float32
        # products), so that statistics cost the same for every method
        self.lower = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
        self._squares = torch.zeros(d_in, dtype=torch.float64, device=device)  # accumulate_sums' other output
        self.tokens = 0

    @property
    def H(self) -> torch.Tensor | None:
        """The full H = sum X^T X in float32 (None once freed)."""
        return None if self.lower is None else (self.lower + self.lower.tril(-1).T).float()

    def add_batch(self, inp: torch.Tensor) -> None:
        X = inp.detach().reshape(-1, self.lower.shape[0])
        _ops.accumulate_sums(self.lower, self._squares, X)
        self.tokens += X.shape[0]

    def _prune(self, W: torch.Tensor, H: torch.Tensor, sparse_ratio: float) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def fasterprune(self, sparse_ratio: float = 0.5) -> PruneReport:
        """Prune the layer in place. With an N:M pattern, `sparse_ratio` is ignored (it is n/m)."""
        if not 0.0 <= sparse_ratio <= 1.0:
            raise ValueError(f"sparse_ratio must lie in [0, 1], got {sparse_ratio}")
        t0 = time.perf_counter()
        weight = self.layer.weight
        W = weight.detach().float().clone()  # the original, for the error below
        H = self.H
        W_new, damp = self._prune(W, H, sparse_ratio)
        weight.data.copy_(W_new.to(weight.dtype))
        seconds = time.perf_counter() - t0
        return PruneReport(
            sparsity=(weight == 0).float().mean().item(),
            relative_error=relative_output_error(W, weight.detach().float(), H),
            seconds=seconds,
            damping=damp,
            tokens=self.tokens,
            shape=tuple(weight.shape),
        )

    def free(self) -> None:
        self.lower = self._squares = None


class MagnitudePruner(_HessianPruner):
    name = "magnitude"

    def _prune(self, W, H, sparse_ratio):
        return magnitude_prune(W, sparse_ratio, self.prune_n, self.prune_m), 0.0


class WandaPruner(_HessianPruner):
    name = "wanda"

    def _prune(self, W, H, sparse_ratio):
        col_norm = torch.diag(H).sqrt()  # ||X_j||_2 over all calibration tokens
        return wanda_prune(W, col_norm, sparse_ratio, self.prune_n, self.prune_m), 0.0


class SparseGPTPruner(_HessianPruner):
    name = "sparsegpt"

    def __init__(self, layer, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01):
        super().__init__(layer, prune_n, prune_m)
        self.blocksize, self.percdamp = blocksize, percdamp

    def _prune(self, W, H, sparse_ratio):
        return sparsegpt_prune(
            W,
            H,
            sparse_ratio,
            self.prune_n,
            self.prune_m,
            blocksize=self.blocksize,
            mask_blocksize=self.blocksize,
            percdamp=self.percdamp,
        )
