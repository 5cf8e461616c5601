"""Fast mode: the seed's ADMM (SPEC §2's normalisation, damping and rho) in fewer, cheaper iterations.

What differs from the seed's 15 re-selections + 5 fixed-mask iterations, each measured in
benchmarks/bench_fast.py and benchmarks/RESULTS.md:
- over-relaxation (Boyd et al. 2011, §3.4.3): the projection sees alpha·Wn + (1 - alpha)·Z instead of Wn;
  with alpha = 1.8 the mask settles in about half the iterations, to a mask at least as good;
- the mask is re-chosen only until it settles: until fewer than MASK_TOL·k pruned entries change in one
  iteration (or the seed's prune_iters); then FIXED_ITERS more iterations on that mask;
- the iterations before the last run their GEMM in bfloat16 where that is faster (AMX / AVX512-BF16 CPUs,
  CUDA); the last iteration is float32, so the returned weights carry no bfloat16 rounding;
- Wn = Wn0 + rho·Hinv·(Z - U - Wn0) (the seed's Hinv·(B + rho(Z - U)) with B = Hd Wn0 = (Hinv⁻¹ - rho)Wn0
  expanded): no B, so no GEMM before the loop, and the bfloat16 rounding falls on the step, not the weight.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from . import _ops
from .quality import pruned_set

ALPHA = 1.8  # over-relaxation (convergent for alpha in (0, 2) in the convex case)
MASK_TOL = 0.002  # re-select while more than this fraction of the k pruned entries changes per iteration
FIXED_ITERS = 2  # fixed-mask iterations after the mask settles (the last in float32)
BF16_MIN_SPEEDUP = 1.3  # use bfloat16 GEMMs only when measured at least this much faster


@dataclass
class FastInfo:
    iterations: int  # all ADMM iterations (mask re-selections + fixed-mask)
    mask_iterations: int  # iterations that re-chose the mask
    low_precision: str  # dtype of the iterations before the last ("bfloat16" or "float32")


@functools.lru_cache(maxsize=None)
def _bf16_faster_on_cpu(size: int = 512) -> bool:
    """Whether a bfloat16 GEMM beats float32 by BF16_MIN_SPEEDUP on this CPU (timed once: without AMX or
    AVX512-BF16, torch runs bfloat16 GEMMs slower than float32)."""
    def best(dtype):
        a = torch.randn(size, size).to(dtype)
        torch.mm(a, a)  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(a, a)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) >= BF16_MIN_SPEEDUP * best(torch.bfloat16)


def low_precision_dtype(device: torch.device) -> torch.dtype:
    """The GEMM dtype of the iterations that tolerate noise: bfloat16 where it is faster, else float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if _bf16_faster_on_cpu() else torch.float32
    return torch.float32


def admm_fast(h_lower: torch.Tensor, weight: torch.Tensor, k: int, structure: tuple[str, int, int],
              percdamp: float, rho: float, max_mask_iters: int, low_dtype: torch.dtype):
    """Returns (pruned float32 weight in W layout with exactly k zeros, dampings (percdamp·mean, retry
    extra), FastInfo). h_lower: the statistics' lower triangle; weight: float32 [d_out, d_in]."""
    d = h_lower.diagonal().sqrt() + 1e-8
    hn = h_lower / d[:, None] / d[None, :]  # only its lower triangle is read below
    damping = percdamp * hn.diagonal().mean().item()
    shift = float(torch.tensor(damping + rho, dtype=torch.float32))  # as the op holds it: no false retry warning
    hinv, used = _ops.damped_cholesky_inverse(hn, shift)
    del hn
    hinv_low = hinv.to(low_dtype)
    wn0 = (weight * d).T.contiguous()

    wn, u, z = wn0, torch.zeros_like(wn0), wn0
    pruned, settled, mask_iters, after = None, False, 0, 0
    while after < FIXED_ITERS:
        v = (z * (1 - ALPHA)).add_(wn, alpha=ALPHA).add_(u)  # over-relaxed Wn, plus the scaled dual
        if not settled:
            previous, pruned = pruned, pruned_set(v, k, structure)
            mask_iters += 1
            # settled: fewer swaps than the tolerance (as many entries leave the pruned set as enter it)
            changed = k if previous is None else int((pruned != previous).sum()) // 2
            settled = changed <= MASK_TOL * k or mask_iters >= max_mask_iters
        else:
            after += 1
        z = v.masked_fill(pruned, 0.0)
        u = v.masked_fill_(~pruned, 0.0)  # v - z, in v's buffer
        step = (z - u).sub_(wn0)
        gemm = hinv if after == FIXED_ITERS else hinv_low  # the last iteration in float32
        wn = torch.mm(gemm, step.to(gemm.dtype)).float().mul_(rho).add_(wn0)
    out = (wn + u).masked_fill_(pruned, 0.0).T / d
    info = FastInfo(mask_iters + FIXED_ITERS, mask_iters, str(low_dtype).removeprefix("torch."))
    return out, torch.tensor([damping, float(used) - shift]), info
