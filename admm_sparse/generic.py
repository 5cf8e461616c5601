"""The native ops in plain PyTorch, for devices without admm_sparse's kernels (Ascend NPUs, XPUs, MPS, ...).

Each function takes and returns what its native op does (csrc/ops.cpp: lower triangles, the damping retry, the
index tie-breaks, the same output tuples) and runs on its tensors' device; what that device cannot compute
(device.supports) runs on the CPU, moving only the d_in x d_in matrix. The selections and the ADMM loop are the
oracle's own (admm_sparse.reference), so the generic path and the native one agree as the tests check them
against each other: to float32 rounding. admm_sparse._ops chooses between the two per op and device.
"""
from __future__ import annotations

import torch

from . import device as devices
from . import reference
from .reference import prune_mask, prune_mask_nm, prune_mask_rows  # noqa: F401  (the generic selections)

MAX_RETRIES = 12  # as csrc/admm.cpp's kMaxRetries


def symmetric(lower: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle is `lower`'s (its upper triangle is never read)."""
    return lower.tril() + lower.tril(-1).T


def accumulate_sums(hessian_sum: torch.Tensor, square_sum: torch.Tensor, inp: torch.Tensor) -> None:
    """In place: hessian_sum's lower triangle += XᵀX, square_sum += Σ x² per channel. The batch's products are
    float32 on the input's device; the float64 sums may live on the CPU (device.statistics_device)."""
    x = inp.reshape(-1, inp.shape[-1]).float()
    hessian_sum += (x.T @ x).tril().to(hessian_sum.device)
    square_sum += (x * x).sum(0).to(square_sum.device)


def damped_cholesky_inverse(matrix: torch.Tensor, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(matrix + shift·I)⁻¹ from its lower triangle; a factorisation that fails is retried with more shift, as
    natively (from 1e-6 of the mean |diagonal|, 10x each time). On a device without a Cholesky factorisation it
    runs on the CPU. Returns (the inverse on matrix's device, the shift used as a float32 scalar there)."""
    if not torch.isfinite(matrix).all():
        raise RuntimeError("damped_cholesky_inverse: matrix contains NaN or inf")
    home = matrix.device
    work = symmetric(matrix if devices.supports("cholesky", home) else matrix.cpu())
    n = work.shape[0]
    mean_diag = work.diagonal().abs().mean().item() if n else 0.0
    eye = torch.eye(n, dtype=work.dtype, device=work.device)
    extra = 0.0
    for attempt in range(MAX_RETRIES + 1):
        factor, info = torch.linalg.cholesky_ex(work + (shift + extra) * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(factor).to(home), torch.tensor(shift + extra, device=home)
        extra = max(1e-6 * mean_diag, 1e-10) if extra == 0.0 else extra * 10.0
    raise RuntimeError(f"damped_cholesky_inverse: matrix is not positive definite even with {shift + extra} added "
                       "to its diagonal")


def normalised(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """SPEC §2 steps 1-2 on the lower triangle of `hessian`, rounded as the native op rounds them: (d = sqrt(diag H)
    + 1e-8, the damped Hn = H / d_i / d_j + damping·I, damping = percdamp · mean diag, a float32 product)."""
    h = symmetric(hessian)
    d = h.diagonal().sqrt() + 1e-8
    hn = h / d[:, None] / d[None, :]
    damping = float(torch.tensor(percdamp, dtype=torch.float32) * hn.diagonal().mean().cpu())
    hn.diagonal().add_(damping)
    return d, hn, damping


def admm_prune(hessian: torch.Tensor, weight: torch.Tensor, k: int, percdamp: float, rho: float, iters: int,
               prune_iters: int, structure: str = "unstructured") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC §2 on the lower triangle of `hessian`: (the pruned float32 weight, the dampings (percdamp·mean,
    a retry's extra), tr(W H Wᵀ) of the input weight), as the native admm_prune returns them."""
    if not 0 <= k <= weight.numel():
        raise RuntimeError(f"k must be in [0, {weight.numel()}], got {k}")
    d, hn, damping = normalised(hessian, percdamp)
    wn = (weight.float() * d).T.contiguous()
    b = hn @ wn
    dense_energy = (wn * b).sum(dtype=torch.float64) - damping * (wn * wn).sum(dtype=torch.float64)
    hinv, used = damped_cholesky_inverse(hn, rho)
    u = torch.zeros_like(wn)
    keep = torch.ones_like(wn)
    for it in range(iters):
        v = wn + u
        if it < prune_iters:
            pruned = reference.prune_mask(v, k) if structure == "unstructured" else \
                reference.structured_mask(v.T, k, structure).T  # unstructured ties: lowest flat index of Wn
            keep = (~pruned).float()
        z = v * keep
        u = v - z
        wn = hinv @ (b + rho * (z - u))
    out = ((wn + u) * keep).T / d
    dampings = torch.tensor([damping, float(used) - float(torch.tensor(rho, dtype=used.dtype))], device=weight.device)
    return out.contiguous(), dampings, dense_energy.float()
