"""Plain PyTorch of SPEC §1-3: the oracle the tests compare the native ops against, and the
baseline the benchmarks time. Written to be read top to bottom, like the original tool: an explicit
inverse, a full sort for the mask, separate elementwise passes. Not for production use.
"""
from __future__ import annotations

import torch


def accumulate_sums(hessian_sum: torch.Tensor, square_sum: torch.Tensor, inp: torch.Tensor):
    """SPEC §1's statistics as float64 sums of each batch's float32 products, on the full (symmetric) Hessian,
    in place. The Hessian is hessian_sum in float32; the scaler (SPEC's running mean over sequences, which
    telescopes to the sum over the count) is square_sum / sequences in float32."""
    x = inp.reshape(-1, inp.shape[-1]).float()
    hessian_sum += (x.T @ x).double()
    square_sum += (x * x).sum(0).double()


def damped_cholesky_inverse(matrix: torch.Tensor, shift: float) -> torch.Tensor:
    """(matrix + shift I)^-1 through Cholesky (no retry: the oracle assumes a positive definite input)."""
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(matrix + shift * eye))


def prune_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """True at the k smallest |values|; ties go to the lower flat index (a stable sort keeps index order)."""
    order = torch.sort(values.abs().flatten(), stable=True).indices
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    mask[order[:k]] = True
    return mask.view(values.shape)


def prune_mask_rows(values: torch.Tensor, k: int) -> torch.Tensor:
    """True at the k smallest |values| of every row of a matrix; ties go to the lower column (stable sort)."""
    order = torch.sort(values.abs(), dim=1, stable=True).indices
    mask = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    mask.scatter_(1, order[:, :k], True)
    return mask


def prune_mask_nm(values: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True at the m - n smallest |values| of every group of m consecutive entries of each row."""
    rows, cols = values.shape
    return prune_mask_rows(values.reshape(rows * (cols // m), m), m - n).reshape(rows, cols)


def structured_mask(values: torch.Tensor, k: int, structure: str = "unstructured") -> torch.Tensor:
    """The pruned set of a [d_out, d_in] weight-shaped tensor for a mask structure (k pruned in all)."""
    if structure == "unstructured":
        return prune_mask(values, k)
    if structure == "per_row":
        return prune_mask_rows(values, k // values.shape[0])
    n, m = (int(t) for t in structure.split(":"))
    return prune_mask_nm(values, n, m)


def admm_prune(hessian: torch.Tensor, weight: torch.Tensor, k: int, percdamp: float = 0.1, rho: float = 1.0,
               iters: int = 20, prune_iters: int = 15, structure: str = "unstructured") -> torch.Tensor:
    """SPEC §2. hessian: full symmetric [d_in, d_in]; weight: [d_out, d_in]. Returns the float32 pruned weight.
    structure: the mask's shape on W (the iterate here is Wn = (W d)ᵀ, so a structured mask is selected on
    Vᵀ). Unstructured ties (SPEC: "broken deterministically") go to the lowest flat index of V, as natively."""
    d = hessian.diagonal().sqrt() + 1e-8
    hn = hessian / d[:, None] / d[None, :]
    wn = (weight.float() * d).T.contiguous()  # a transposed view would round B = Hn Wn differently
    eye = torch.eye(hn.shape[0], dtype=hn.dtype, device=hn.device)
    hn = hn + percdamp * hn.diagonal().mean() * eye
    b = hn @ wn
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(hn + rho * eye))
    u = torch.zeros_like(wn)
    mask = torch.ones_like(wn)
    for it in range(iters):
        v = wn + u
        if it < prune_iters:
            pruned = prune_mask(v, k) if structure == "unstructured" else structured_mask(v.T, k, structure).T
            mask = (~pruned).float()
        z = v * mask
        u = v - z
        wn = hinv @ (b + rho * (z - u))
    z = (wn + u) * mask
    return z.T / d


def keepbit_round(w: torch.Tensor, keep: torch.Tensor | None = None, keep_bits: int = 2) -> torch.Tensor:
    """SPEC §3 rounding of w (any float dtype) in float16, written with frexp as the SPEC states it.
    Where `keep` is True the mantissa is left unrounded (the small-exponent band rule still applies)."""
    x = w.to(torch.float16).float()
    mant, exp = torch.frexp(x)
    m = mant.abs() * 2
    e = (exp - 1).float()
    subnormal = (e < -14) & (x != 0)
    m = torch.where(subnormal, x.abs() * 2.0**15, m)
    e = torch.where(subnormal, torch.full_like(e, -15), e)
    m = torch.where(x == 0, torch.zeros_like(m), m)
    e = torch.where(x == 0, torch.zeros_like(e), e)
    e = torch.where(torch.isinf(x), torch.full_like(e, 16), e)

    scale = 2.0**keep_bits
    m_new = torch.round(m * scale) / scale
    m_new = torch.where(e < -14, torch.zeros_like(m_new), m_new)
    if keep is not None:
        m_new = torch.where(keep, m, m_new)
    band = (e > -15) & (e < keep_bits - 10)
    m_new = torch.where(band, torch.where(m > 1.5, 2.0, 1.0), m_new)
    out = torch.sign(x) * m_new * torch.pow(2.0, e)
    return out.to(torch.float16)


def keep_mask(w: torch.Tensor, scaler: torch.Tensor, keep_bits: int = 2, keep_proportion: float = 0.02):
    """SPEC §3 keep mask: the largest rounding errors weighted by sqrt(scaler), by a full sort."""
    metric = (w.float() - keepbit_round(w, None, keep_bits).float()).abs() * scaler.sqrt()[None, :]
    v = torch.sort(metric.flatten(), descending=True).values[int(metric.numel() * keep_proportion - 1)]
    return metric >= v


def salience_round(w: torch.Tensor, scaler: torch.Tensor, level: float) -> torch.Tensor:
    """Rounding by salience (admm_sparse.keepbits), written with frexp: b = round(level + ½·log2(s_j·w² / mean over
    the non-zero weights)) in [1, 10] mantissa bits after the leading one, half to even; zeros and subnormals kept."""
    x = w.to(torch.float16).float()
    salience = x * x * scaler.float()[None, :]  # float32, as the kernel: the bits are compared exactly
    nonzero = x != 0
    mean = float(salience[nonzero].double().sum()) / max(int(nonzero.sum()), 1)
    if not mean > 0:
        bits = torch.full(x.shape, float(min(max(round(level), 1), 10)))
    else:
        bits = (0.5 * torch.log2((salience / mean).clamp(min=1e-30)) + level).round().clamp(1, 10)
    x, bits = x.double(), bits.double()
    mant, exp = torch.frexp(x)  # x = mant·2^exp, 0.5 <= |mant| < 1: b bits after the leading one is mant·2^(b+1)
    scale = torch.pow(2.0, bits + 1)
    out = torch.ldexp(torch.round(mant * scale) / scale, exp)
    keep = (x.abs() < 2.0**-14) | ~torch.isfinite(x) | (out.abs() > 65504)
    return torch.where(keep, x, out).to(torch.float16).abs().mul(torch.sign(x.to(torch.float16))).add(0.0)


def prune_linear(weight: torch.Tensor, inputs, sparse_ratio: float, keep_bits: int | None = 2,
                 keep_proportion: float = 0.02, percdamp: float = 0.1, rho: float = 1.0, iters: int = 20,
                 prune_iters: int = 15) -> torch.Tensor:
    """SPEC §1-3 end to end on a weight and an iterable of input batches; returns the new weight."""
    d_in = weight.shape[1]
    hessian_sum = torch.zeros(d_in, d_in, dtype=torch.float64, device=weight.device)
    square_sum = torch.zeros(d_in, dtype=torch.float64, device=weight.device)
    n = 0
    for inp in inputs:
        accumulate_sums(hessian_sum, square_sum, inp)
        n += inp.shape[0] if inp.dim() >= 3 else 1
    hessian, scaler = hessian_sum.float(), (square_sum / n).float()
    k = int(weight.shape[0] * d_in * sparse_ratio)
    pruned = admm_prune(hessian, weight, k, percdamp, rho, iters, prune_iters).to(weight.dtype)
    if keep_bits is None:
        return pruned
    keep = keep_mask(pruned, scaler, keep_bits, keep_proportion)
    return keepbit_round(pruned, keep, keep_bits).to(weight.dtype)
