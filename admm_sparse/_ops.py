"""Thin typed wrappers over torch.ops.admm_sparse, plus their fake (meta) kernels.

Every op's plain-PyTorch twin is in admm_sparse.reference; the schemas are in csrc/ops.cpp. Each wrapper runs
the native kernel where the tensors' device has one (device.native: CPU, CUDA), else the op's plain-PyTorch
implementation in admm_sparse.generic (Ascend NPUs, XPUs, MPS, ...).
"""
from __future__ import annotations

import warnings

import torch

from . import device as devices
from . import generic

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        f"admm_sparse's native extension admm_sparse._C failed to load ({exc}). It must be built against "
        f"the torch you run (now {torch.__version__}); rebuild it from the repository root with:\n"
        "    pip install --no-build-isolation -e ."
    ) from exc

_ops = torch.ops.admm_sparse


def accumulate_sums(hessian_sum: torch.Tensor, square_sum: torch.Tensor, inp: torch.Tensor) -> None:
    """In place, float64: hessian_sum's lower triangle += XᵀX and square_sum += Σ X² per channel (SPEC §1's
    statistics as sums; each batch's products are float32 GEMMs blocked by d_in alone)."""
    with devices.no_autocast(inp.device):  # float32 products inside the calibration passes' autocast too
        if devices.supports("float64", inp.device) and hessian_sum.device == inp.device:
            _ops.accumulate_sums(hessian_sum, square_sum, inp)  # device-generic ATen (CompositeExplicitAutograd)
        else:  # the sums on the CPU: the device has no float64
            generic.accumulate_sums(hessian_sum, square_sum, inp)


def damped_cholesky_inverse(matrix: torch.Tensor, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(matrix + shift·I)⁻¹ from its lower triangle, retried with more shift if not positive definite.
    Returns (inverse, shift used)."""
    if devices.supports("cholesky", matrix.device):
        inverse, used = _ops.damped_cholesky_inverse(matrix, shift)  # device-generic ATen
    else:
        inverse, used = generic.damped_cholesky_inverse(matrix, shift)
    warn_if_damped(float(used) - float(torch.tensor(shift, dtype=used.dtype)))  # the op holds shift in its dtype
    return inverse, used


def prune_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k smallest |values| (ties: lower flat index first)."""
    return _ops.prune_mask(values, k) if devices.native("prune_mask", values.device) else generic.prune_mask(values, k)


def prune_mask_rows(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask [R, C]: the k smallest |values| of every row (ties: lower column first)."""
    if devices.native("prune_mask_rows", values.device):
        return _ops.prune_mask_rows(values, k)
    return generic.prune_mask_rows(values, k)


def prune_mask_nm(values: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask [R, C] (C a multiple of m): the m - n smallest |values| of every group of m consecutive
    entries of a row (ties: lower column first), so that at most n per group remain unselected."""
    if devices.native("prune_mask_nm", values.device):
        return _ops.prune_mask_nm(values, n, m)
    return generic.prune_mask_nm(values, n, m)


def admm_prune(hessian: torch.Tensor, weight: torch.Tensor, k: int, percdamp: float, rho: float, iters: int,
               prune_iters: int, structure: str = "unstructured") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC §2: returns (pruned float32 weight with k entries zeroed, the damping added to the normalised
    H as (percdamp·mean(diag), extra from a retry), tr(W H Wᵀ) of the input weight: the dense output
    energy on the calibration data). structure: "unstructured", "per_row" or "N:M" (see csrc/ops.cpp)."""
    run = _ops.admm_prune if devices.native("admm_prune", weight.device) else generic.admm_prune
    out, damping, dense_energy = run(hessian, weight, k, percdamp, rho, iters, prune_iters, structure)
    warn_if_damped(float(damping[1]))
    return out, damping, dense_energy


def warn_if_damped(extra: float) -> None:
    if extra > 0:
        warnings.warn(f"admm_sparse: the damped Hessian was not positive definite; added {extra:.3g} more damping "
                      "to its diagonal (usually too few calibration tokens for this layer)", stacklevel=3)


@torch.library.register_fake("admm_sparse::accumulate_sums")
def _(hessian_sum, square_sum, inp):
    return None


@torch.library.register_fake("admm_sparse::damped_cholesky_inverse")
def _(matrix, shift):
    return torch.empty_like(matrix, memory_format=torch.contiguous_format), matrix.new_empty(())


@torch.library.register_fake("admm_sparse::prune_mask")
def _(values, k):
    return torch.empty_like(values, dtype=torch.bool, memory_format=torch.contiguous_format)


@torch.library.register_fake("admm_sparse::prune_mask_rows")
def _(values, k):
    return torch.empty_like(values, dtype=torch.bool, memory_format=torch.contiguous_format)


@torch.library.register_fake("admm_sparse::prune_mask_nm")
def _(values, n, m):
    return torch.empty_like(values, dtype=torch.bool, memory_format=torch.contiguous_format)


@torch.library.register_fake("admm_sparse::admm_prune")
def _(hessian, weight, k, percdamp, rho, iters, prune_iters, structure="unstructured"):
    return weight.new_empty(weight.shape), weight.new_empty((2,)), weight.new_empty(())
