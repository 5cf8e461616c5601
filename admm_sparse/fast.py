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

import functools
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import _ops
from . import device as devices
from .quality import pruned_set

ALPHA = 1.5  # over-relaxation (convergent for alpha in (0, 2) in the convex case)
MASK_TOL = 0.001  # re-select while more than this fraction of the k pruned entries swaps per iteration
FIXED_ITERS = 2  # fixed-mask iterations after the mask settles
BF16_MIN_SPEEDUP = 1.3  # use bfloat16 GEMMs only when measured at least this much faster


@functools.lru_cache(maxsize=None)
def _bf16_faster_on_cpu() -> bool:
    """Whether a 512³ bfloat16 GEMM beats float32 by BF16_MIN_SPEEDUP on this CPU, timed once (bfloat16 GEMMs
    are fast only with hardware support such as AMX or AVX512-BF16). Its own generator: the caller's random
    stream is left alone."""
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))

    def best(dtype):
        m = a.to(dtype)
        torch.mm(m, m)  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(m, m)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) >= BF16_MIN_SPEEDUP * best(torch.bfloat16)


def low_precision_dtype(device: torch.device) -> torch.dtype:
    """The GEMM dtype of fast mode's iterations: bfloat16 where it is faster, else float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if _bf16_faster_on_cpu() else torch.float32
    return torch.float32


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
    hinv: torch.Tensor  # (Hn + (damping + rho)·I)⁻¹ in the GEMM dtype (low_precision_dtype)
    damping: float  # percdamp · mean diag(Hn)
    used: torch.Tensor  # the damping the Cholesky succeeded with (more after retries)


@contextmanager
def _one_cpu_thread(device: torch.device):
    """On the CPU, torch ops inside run on one thread."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def factor(h_lower: torch.Tensor, percdamp: float, rho: float, low_dtype: torch.dtype) -> Factor:
    """The normalised, damped inverse of the statistics' lower triangle h_lower, as the seed forms it."""
    d = h_lower.diagonal().sqrt() + 1e-8
    hn = h_lower / d[:, None] / d[None, :]  # only its lower triangle is read below
    damping = percdamp * hn.diagonal().mean().item()
    # On one CPU thread: torch 2.13's cholesky_inverse measured 1.3-2.8x slower on 2 threads than on one
    # (2048 and 4096, this 2-core machine; issue 30).
    with _one_cpu_thread(hn.device):
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
