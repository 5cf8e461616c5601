"""Quality mode: an ADMM that runs until its mask has settled, then refits the kept weights exactly; and
rounding inside the solver (round_in_admm): keep-bit rounding with error compensation on the ADMM's support.

After ALPS (Meng et al., NeurIPS 2024), written from the paper's description:
- the normalised, damped Hessian Hd = Hn + δI is eigendecomposed once, Hd = Q Λ Qᵀ, so that
  (Hd + ρI)⁻¹ = Q diag(1/(λ+ρ)) Qᵀ costs one GEMM for every new ρ;
- ρ grows while the support still changes: every `check_every` iterations the fraction of the pruned
  set that changed since the last check sets the step (larger change, larger step); the loop stops at the
  first check where nothing changed, or at the iteration cap;
- the kept weights are then refit on the final support: for every output row (a column of Wn) the exact
  minimiser of (w - w0)ᵀ Hd (w - w0) with w zero off the support, i.e. Hd_SS w_S = (Hd w0)_S, solved for
  all rows at once by a Jacobi-preconditioned conjugate gradient (one d_in x d_in GEMM per step).
Everything runs in the normalised, transposed space of SPEC §2 (Wn = (W d)ᵀ, d_in x d_out).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _ops
from .keepbits import round_float16, round_to_bits, salience_mantissa_bits, salience_mean

ROUND_PERCDAMP = 0.1  # damping of the rounding compensation (measured: 0.1 beats 0.01 and 0.3)


@dataclass
class QualityInfo:
    iterations: int
    final_rho: float
    error_before_refit: float  # relative output error (undamped H) of the ADMM's projected iterate
    error_after_refit: float  # ... after the exact refit on its support


def normalise(h_lower: torch.Tensor, weight: torch.Tensor):
    """d, undamped normalised Hn (full symmetric) and Wn = (W d)ᵀ, as SPEC §2 step 1."""
    d = h_lower.diagonal().sqrt() + 1e-8
    hn = h_lower.tril() + h_lower.tril(-1).T
    hn = hn / d[:, None] / d[None, :]
    return d, hn, (weight.float() * d).T.contiguous()


def pruned_set(v: torch.Tensor, k: int, structure: tuple[str, int, int]) -> torch.Tensor:
    """The pruned entries of the iterate v (Wn layout, d_in x d_out) for a mask structure on W = vᵀ."""
    kind, n, m = structure
    if kind == "unstructured":
        return _ops.prune_mask(v, k)
    if kind == "per_row":
        return _ops.prune_mask_rows(v.T, k // v.shape[1]).T
    return _ops.prune_mask_nm(v.T, n, m).T


def relative_error(hn: torch.Tensor, delta: torch.Tensor, dense: float) -> float:
    """sqrt(tr(Δᵀ Hn Δ) / dense) for Δ in the normalised space (= ||X ΔWᵀ|| / ||X W0ᵀ||)."""
    e = (delta * (hn @ delta)).sum(dtype=torch.float64).item()
    return math.sqrt(max(e, 0.0) / dense) if dense > 0 else 0.0


def pcg_on_support(a: torch.Tensor, rhs: torch.Tensor, support: torch.Tensor, x0: torch.Tensor, iters: int,
                   tol: float = 1e-6) -> torch.Tensor:
    """Solve A_SS x_S = rhs_S for every column at once (x zero off the support S of that column), A symmetric
    positive definite, by conjugate gradients preconditioned with diag(A). Columns stop individually when
    their residual falls below tol relative to their right-hand side."""
    s = support.to(a.dtype)
    x = x0 * s
    dinv = (1.0 / a.diagonal()).unsqueeze(1)
    r = (rhs - a @ x) * s
    b_norm = (rhs * s).norm(dim=0).clamp_min(1e-30)
    z = dinv * r
    p = z
    rz = (r * z).sum(0)
    for _ in range(iters):
        active = r.norm(dim=0) > tol * b_norm
        if not bool(active.any()):
            break
        ap = (a @ p) * s
        den = (p * ap).sum(0)
        alpha = torch.where(active & (den > 0), rz / torch.where(den > 0, den, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        z = dinv * r
        rz_new = (r * z).sum(0)
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, 1.0), 0.0)
        p = z + beta * p
        rz = rz_new
    return x


def rho_step(changed_fraction: float) -> float:
    """Multiplicative ρ increase for the fraction of the pruned set that changed since the last check."""
    if changed_fraction > 0.1:
        return 1.3
    if changed_fraction > 0.01:
        return 1.2
    return 1.1


def make_context(h_lower: torch.Tensor, weight: torch.Tensor, percdamp: float) -> dict:
    """Normalisation, damping, B = Hd Wn0, the dense output energy and Hd's eigendecomposition (once)."""
    d, hn, wn0 = normalise(h_lower, weight)
    damping = percdamp * hn.diagonal().mean().item()
    hd = hn.clone()
    hd.diagonal().add_(damping)
    b = hd @ wn0
    dense = (wn0 * (hn @ wn0)).sum(dtype=torch.float64).item()
    lam, q = torch.linalg.eigh(hd)
    lam = lam.clamp_min(max(damping, 1e-12))  # Hd is positive definite up to rounding

    def hinv(r):
        return (q * (1.0 / (lam + r))) @ q.T

    return dict(d=d, hn=hn, hd=hd, wn0=wn0, b=b, dense=dense, hinv=hinv, damping=damping, rho=1.0)


def admm_quality(h_lower: torch.Tensor, weight: torch.Tensor, k: int, structure: tuple[str, int, int],
                 percdamp: float, rho: float, max_iters: int, check_every: int, refit_iters: int,
                 seed_candidate: torch.Tensor | None = None):
    """Returns (Wn after refit, pruned mask in Wn layout, context for rounding, QualityInfo).
    seed_candidate: the seed mode's pruned weight (W layout); its support, refit, is taken if better."""
    ctx = make_context(h_lower, weight, percdamp)
    hn, hd, wn0, b, dense, hinv = ctx["hn"], ctx["hd"], ctx["wn0"], ctx["b"], ctx["dense"], ctx["hinv"]
    inv = hinv(rho)
    wn, u = wn0.clone(), torch.zeros_like(wn0)
    pruned_check = None
    it = 0
    pruned = None
    while it < max_iters:
        v = wn + u
        pruned = pruned_set(v, k, structure)
        z = v.masked_fill(pruned, 0.0)
        u = v - z
        wn = inv @ (b + rho * (z - u))
        it += 1
        if it % check_every == 0:
            if pruned_check is not None:
                changed = int((pruned != pruned_check).sum()) // 2  # swaps: as many left as entered
                if changed == 0:
                    break
                step = rho_step(changed / max(k, 1))
                rho *= step
                u = u / step  # scaled dual: keep the unscaled multiplier when rho changes
                inv = hinv(rho)
            pruned_check = pruned
    z = (wn + u).masked_fill(pruned, 0.0)
    before = relative_error(hn, z - wn0, dense)
    refit = pcg_on_support(hd, b, ~pruned, z, refit_iters)
    after = relative_error(hn, refit - wn0, dense)
    if after > before:  # never worse than the ADMM's own iterate (a refit cut short by the cap)
        refit, after = z, before
    if seed_candidate is not None:  # the seed's support, refit: kept when it is better (rarely, measured)
        seed_pruned = (seed_candidate * ctx["d"]).T == 0
        seed_refit = pcg_on_support(hd, b, ~seed_pruned, (seed_candidate * ctx["d"]).T, refit_iters)
        seed_after = relative_error(hn, seed_refit - wn0, dense)
        if seed_after < after:
            refit, after, pruned = seed_refit, seed_after, seed_pruned
    ctx["rho"] = rho
    return refit, pruned, ctx, QualityInfo(it, rho, before, after)


def keep_budget(numel: int, keep_proportion: float) -> int:
    """How many off-grid (full-mantissa) entries SPEC §3's keep mask can hold: its index int(numel·p - 1) + 1."""
    if keep_proportion <= 0:
        return 0
    pos = int(numel * keep_proportion - 1)
    if pos < 0:
        pos += numel
    return min(pos + 1, numel)


def round_with_feedback(wn: torch.Tensor, pruned: torch.Tensor, ctx: dict, keep_bits: int, keep_proportion: float,
                        refit_iters: int, block: int = 128, salience: tuple[torch.Tensor, float] | None = None
                        ) -> torch.Tensor:
    """Round the solver's weight onto the Atlas card's values (pruned zeros, at most the keep budget of
    full-mantissa entries, the rest on the keep-bit grid) while compensating the error, then refit the
    full-mantissa entries. Returns the W-layout float32 weight, exactly representable.

    The compensation is the optimal-brain-quantisation step (as in GPTQ, Frantar et al. 2023, written from
    the paper): inputs are rounded one at a time, most energetic first, and each rounding error is pushed
    onto the inputs not yet rounded through the Cholesky factor of Hd⁻¹, so later inputs absorb it. The
    full-mantissa set is fixed up front: the entries of largest normalised rounding error. The compensation
    uses the Hessian damped by ROUND_PERCDAMP whatever the solver used (measured better than less damping).

    salience = (scaler, level): rounding by salience instead (keepbits.round_by_salience): each entry, as the
    compensation has moved it, to the mantissa bits of its salience against the mean salience of the weight before
    rounding; no full-mantissa set, so no refit."""
    d = ctx["d"]
    hd = ctx["hn"].clone()
    hd.diagonal().add_(ROUND_PERCDAMP * hd.diagonal().mean())
    budget = 0 if salience is not None else keep_budget(wn.numel(), keep_proportion)
    w_layout = wn.T / d
    if salience is not None:
        scaler, level = salience
        mean = salience_mean(w_layout, scaler)
    if budget > 0:
        metric = ((w_layout.to(torch.float16).float() - round_float16(w_layout, None, keep_bits).float()).abs_()
                  * d[None, :]).masked_fill_(pruned.T, 0.0)
        keep = ~_ops.prune_mask(metric, metric.numel() - budget).T
        del metric
    else:
        keep = torch.zeros_like(pruned)
    del w_layout

    order = torch.argsort((wn * wn).sum(1), descending=True)  # act order: large rows first
    w = wn[order]
    kept, zero, dd = keep[order], pruned[order], d[order]
    if salience is not None:
        channel = scaler.float()[order]
        bits = torch.empty(w.shape, dtype=torch.int32, device=w.device)  # each entry's mantissa bits, as rounded
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd[order][:, order])), upper=True)
    n_in = w.shape[0]
    for b0 in range(0, n_in, block):
        b1 = min(b0 + block, n_in)
        wb, err = w[b0:b1], torch.empty_like(w[b0:b1])
        for i in range(b1 - b0):
            j = b0 + i
            values = wb[i] / dd[j]
            if salience is None:
                q = round_float16(values, kept[j], keep_bits)
            else:
                bits[j] = salience_mantissa_bits(values, channel[j], level, mean)
                q = round_to_bits(values, bits[j])
            q = (q.float() * dd[j]).masked_fill_(zero[j], 0.0)
            err[i] = (wb[i] - q) / u[j, j]
            wb[i] = q
            wb[i + 1:] -= u[j, j + 1:b1, None] * err[i][None, :]
        w[b1:] -= u[b0:b1, b1:].T @ err
    rounded = torch.empty_like(w)
    rounded[order] = w
    if salience is not None:  # undo the float32 error of * d then / d: the values are on their grid already
        bits_layout = torch.empty_like(bits)
        bits_layout[order] = bits
        return round_to_bits(rounded.T / d, bits_layout.T).float()

    # Refit the full-mantissa entries with everything else fixed: Hd_KK x_K = (Hd (w0 - base))_K.
    free = keep & ~pruned
    base = rounded.masked_fill(free, 0.0)
    x = pcg_on_support(hd, hd @ (ctx["wn0"] - base), free, rounded, refit_iters)
    return round_float16((base + x).T / d, free.T, keep_bits).float()
