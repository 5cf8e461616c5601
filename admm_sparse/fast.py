"""Fast mode: the seed's ADMM (SPEC §2's normalisation, damping and rho) in fewer, cheaper iterations.

What differs from the seed's 15 re-selections + 5 fixed-mask iterations (measured in benchmarks/RESULTS.md,
"Fast mode"):
- over-relaxation (Boyd et al. 2011, §3.4.3): the projection sees alpha·Wn + (1 - alpha)·Z instead of Wn,
  which settles the mask in fewer iterations. alpha = 1.5: on correlated inputs 1.8 gave lower errors, on
  independent ones with few tokens (T = d_in) it fitted the calibration tokens better and held-out ones worse;
- the mask is re-chosen only until it settles: until at most MASK_TOL·k pruned entries swap in one
  iteration, or fast_mask_iters times; then FIXED_ITERS more iterations on that mask;
- every iteration runs its GEMM in bfloat16 where that is faster (AMX / AVX512-BF16 CPUs, CUDA), the last
  one too: its product Hinv·step is a correction added to the float32 Wn0 (below), and rounding it to
  bfloat16 left the held-out error unchanged to 0.0001 where a float32 last iteration cost 2.2x its GEMM
  time (issue 30; benchmarks/RESULTS.md, "Fast mode");
- Wn = Wn0 + rho·Hinv·(Z - U - Wn0) (the seed's Hinv·(B + rho(Z - U)) with B = Hd Wn0 = (Hinv⁻¹ - rho)Wn0
  expanded): no B, so no GEMM before the loop, and the bfloat16 rounding falls on the step, not the weight;
- on the CPU, each iteration's elementwise work is two native passes (fast_relax, fast_project).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ops
from . import device as devices
from .quality import pruned_set

ALPHA = 1.5  # over-relaxation (convergent for alpha in (0, 2) in the convex case)
MASK_TOL = 0.001  # re-select while more than this fraction of the k pruned entries swaps per iteration
FIXED_ITERS = 2  # fixed-mask iterations after the mask settles


def relax(gemm_out, wn0, z, u, rho: float, alpha: float) -> None:
    """In place: u <- alpha·(wn0 + rho·gemm_out) + (1 - alpha)·z + u, i.e. V = the over-relaxed Wn plus the
    scaled dual. One native pass where the device has the kernel (the CPU)."""
    if devices.native("fast_relax", u.device):
        torch.ops.admm_sparse.fast_relax(gemm_out, wn0, z, u, rho, alpha)
    else:
        relax_aten(gemm_out, wn0, z, u, rho, alpha)


def relax_aten(gemm_out, wn0, z, u, rho: float, alpha: float) -> None:
    """relax() in ATen ops, for devices without the native kernel: the native pass's float32 operations in its
    order (alpha·(wn0 + rho·gemm_out) + (1 - alpha)·z, then + u), so that both paths round alike."""
    wn = gemm_out.float().mul(rho).add_(wn0)
    u.add_(wn.mul_(alpha).add_(z.mul(1 - alpha)))


def project(u, pruned, previous, wn0, z, step) -> int:
    """With V in u: z <- V off the pruned set, u <- V on it (the scaled dual), step <- z - u - wn0 (in step's
    dtype). Returns how many entries of pruned differ from previous (0 when None). One native pass where the
    device has the kernel (the CPU)."""
    if devices.native("fast_project", u.device):
        return torch.ops.admm_sparse.fast_project(u, pruned, previous, wn0, z, step)
    return project_aten(u, pruned, previous, wn0, z, step)


def project_aten(u, pruned, previous, wn0, z, step) -> int:
    """project() in ATen ops, for devices without the native kernel."""
    changed = 0 if previous is None else int((pruned != previous).sum())
    torch.where(pruned, torch.zeros((), device=u.device), u, out=z)
    u.masked_fill_(~pruned, 0.0)
    step.copy_(z - u - wn0)
    return changed


@dataclass
class Factor:
    """What fast mode's iterations need of a layer's statistics alone: layers with one input (q/k/v, gate/up)
    share it, so the d_in³ inverse is taken once per input (AdmmPruner caches it with the shared statistics)."""

    d: torch.Tensor  # sqrt(diag H): the normalisation
    hinv: torch.Tensor  # (Hn + (damping + rho)·I)⁻¹ in the GEMM dtype (device.gemm_dtype)
    damping: float  # percdamp · mean diag(Hn)
    used: torch.Tensor  # the damping the Cholesky succeeded with (more after retries)


def factor(h_lower: torch.Tensor, percdamp: float, rho: float, low_dtype: torch.dtype) -> Factor:
    """The normalised, damped inverse of the statistics' lower triangle h_lower, as the seed forms it."""
    d = h_lower.diagonal().sqrt() + 1e-8
    hn = h_lower / d[:, None] / d[None, :]  # only its lower triangle is read below
    damping = percdamp * hn.diagonal().mean().item()
    with devices.factorisation_threads(hn.device):
        hinv, used = _ops.damped_cholesky_inverse(hn, damping + rho)
    return Factor(d, hinv.to(low_dtype), damping, used)


def admm_fast(f: Factor, weight: torch.Tensor, k: int, structure: tuple[str, int, int], rho: float,
              max_mask_iters: int):
    """Returns (pruned float32 weight in W layout with exactly k zeros, dampings (percdamp·mean, retry
    extra), ADMM iterations run). f: factor() of the layer's statistics with the same rho; weight: float32
    [d_out, d_in]."""
    d, hinv, damping, used = f.d, f.hinv, f.damping, f.used
    wn0 = (weight * d).T.contiguous()

    # Wn is never stored: V = alpha·Wn + (1 - alpha)·Z + U is built from the GEMM's output directly.
    # The first iteration's V is Wn0 (U = 0, Z = Wn = Wn0).
    u, z = wn0.clone(), torch.empty_like(wn0)
    step = torch.empty_like(wn0, dtype=hinv.dtype)
    pruned, settled, mask_iters, after = None, False, 0, 0
    while True:
        if not settled:
            previous, pruned = pruned, pruned_set(u, k, structure).contiguous()  # structured: a transposed view
            mask_iters += 1
        last = settled and after == FIXED_ITERS - 1
        changed = project(u, pruned, previous if not settled else None, wn0, z, step)
        if not settled:
            # settled: fewer swaps than the tolerance (as many entries leave the pruned set as enter it)
            settled = (previous is not None and changed // 2 <= MASK_TOL * k) or k == 0 \
                or mask_iters >= max_mask_iters
        else:
            after += 1
        gemm_out = torch.mm(hinv, step)
        if last:
            break
        relax(gemm_out, wn0, z, u, rho, ALPHA)
    # The result as the seed forms it (no over-relaxation): Z = (Wn + U) off the pruned set, in float32.
    out = torch.add(wn0, gemm_out, alpha=rho).add_(u).masked_fill_(pruned, 0.0).T / d
    extra = float(used) - float(torch.tensor(damping + rho, dtype=used.dtype))  # the retries' added damping
    return out, torch.tensor([damping, extra]), mask_iters + FIXED_ITERS
