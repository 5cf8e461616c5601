"""SPEC §3: keep-bit rounding ("L2 quantization") of a pruned weight for the Atlas 300I Duo's
compression unit, done on float16 bit patterns (exact, no frexp/pow temporaries): computed once for
all 65536 patterns, then looked up.

A float16 value is sign | exponent E (5 bits) | mantissa M (10 bits), x = ±(1 + M/1024)·2^(E-15),
so the SPEC's m = 1 + M/1024 and e = E - 15 for normal values, and subnormals are E = 0.

Decisions where SPEC §3 is silent (each checked against admm_sparse.reference.keepbit_round):
- a kept subnormal is left as it is (the mantissa is "left unrounded"; only rounded mantissas of
  subnormals are flushed to zero);
- every zero result is +0.0: a -0.0 would not be a zero to the card's compression unit;
- keep_proportion == 0 keeps nothing (the seed's index formula would otherwise keep everything).

Rounding by salience (option `salience_bits`, not in the SPEC): each weight keeps as many mantissa bits as its
share of the layer's output error asks for, instead of keep_bits everywhere and the whole mantissa for a fixed
fraction. A weight's salience is s_j·w² (s_j its input channel's mean square, the scaler), what its rounding error
costs per unit of relative error; rounding to b bits moves it by about |w|·2^-b, so the error it adds is about
s_j·w²·4^-b, and giving each weight b = level + ½·log2(salience / mean salience) (rounded, 1 to 10) makes those
errors about equal: the allocation that minimises the summed error for the mantissa bits spent (reverse water-filling),
the bytes the card stores being about those bits. `level` (salience_bits) is the bits a weight of the layer's mean
salience keeps. Measured on the benchmark protocol (benchmarks/RESULTS.md, "Size and accuracy: the front"), level 1
at sparse_ratio 0.3: 3.804 bits per weight at perplexity 24.49, against keep_bits 1 (keep_proportion 0.02) 4.117
bits at 24.32: 7.6% fewer bytes at +0.7%.
"""
from __future__ import annotations

import functools

import torch

from . import _ops

_SIGN = 0x8000
_MAG = 0x7FFF
_INF = 0x7C00


# Elements per slice of the table look-up: its temporaries (~3 MiB) stay cache-sized and are reused by the
# allocator, instead of full-size copies that each cost a page fault per 4 KiB.
_SLICE = 1 << 18


def round_float16(w: torch.Tensor, keep: torch.Tensor | None = None, keep_bits: int = 2) -> torch.Tensor:
    """Round w (any float dtype) to keep_bits mantissa bits in float16; entries where keep is True keep
    their full mantissa. The small-exponent band (-15 < e < keep_bits - 10) snaps to 1 or 2 everywhere."""
    if not 0 <= keep_bits <= 10:
        raise ValueError(f"keep_bits must be in [0, 10], got {keep_bits}")
    rounded = _rounding_table(keep_bits, False, w.device)
    kept = None if keep is None else _rounding_table(keep_bits, True, w.device)
    flat_w = w.reshape(-1)
    flat_keep = None if keep is None else keep.reshape(-1)
    out = torch.empty(flat_w.shape, dtype=torch.int16, device=w.device)
    for start in range(0, flat_w.numel(), _SLICE):
        part = slice(start, start + _SLICE)
        index = flat_w[part].to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
        if kept is None:
            torch.index_select(rounded, 0, index, out=out[part])
        else:
            out[part] = torch.where(flat_keep[part], kept[index], rounded[index])
    return out.view(torch.float16).view(w.shape)


@functools.lru_cache(maxsize=None)
def _rounding_table(keep_bits: int, keep: bool, device: torch.device) -> torch.Tensor:
    """The rounding is a function of the float16 bit pattern alone: its result for all 65536 patterns
    (as int16, indexed by the pattern read as unsigned), so that rounding a weight is one look-up."""
    patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    keep_all = torch.ones(patterns.shape, dtype=torch.bool) if keep else None
    return _round_slice(patterns, keep_all, keep_bits).view(torch.int16).to(device)


def _round_slice(w: torch.Tensor, keep: torch.Tensor | None, keep_bits: int) -> torch.Tensor:
    """The rounding itself, elementwise on float16 bit patterns (see the module's docstring)."""
    bits = w.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    sign = bits & _SIGN
    mag = bits & _MAG
    exponent = mag >> 10

    drop = 10 - keep_bits
    if drop > 0:
        # Round half to even on the magnitude: a mantissa carry moves into the exponent, which is
        # exactly m' = 2 (and 2·2^15 overflows to inf, as the SPEC's float16 result does).
        # With keep_bits == 0 the kept digit is the implicit leading 1, which is odd: ties round up.
        half = 1 << (drop - 1)
        odd = (mag >> drop) & 1 if keep_bits > 0 else 1
        rounded = ((mag + half - 1 + odd) >> drop) << drop
    else:
        rounded = mag
    rounded = torch.where(exponent == 0, 0, rounded)  # subnormals (and zero) round to zero
    if keep is not None:
        rounded = torch.where(keep, mag, rounded)
    # Band -15 < e < keep_bits - 10, i.e. 1 <= E <= keep_bits + 4: m' = 2 if m > 1.5 else 1.
    band = (exponent >= 1) & (exponent <= keep_bits + 4)
    snapped = torch.where((mag & 0x3FF) > 0x200, (exponent + 1) << 10, exponent << 10)
    out = torch.where(band, snapped, rounded)
    out = torch.where(exponent == 31, mag, out)  # inf and NaN pass through
    out = torch.where(out == 0, 0, out | sign)
    return out.to(torch.int16).view(torch.float16)


def keep_mask(w: torch.Tensor, scaler: torch.Tensor, keep_bits: int = 2, keep_proportion: float = 0.02) -> torch.Tensor:
    """True where the rounding error, weighted by sqrt(scaler) per input channel, is among the largest
    keep_proportion of w (ties at the threshold are all kept, as in the seed)."""
    return _keep_mask(w, round_float16(w, None, keep_bits), scaler, keep_proportion)


def _keep_mask(w: torch.Tensor, rounded: torch.Tensor, scaler: torch.Tensor, keep_proportion: float) -> torch.Tensor:
    """keep_mask, given w rounded without keep."""
    if keep_proportion <= 0:
        return torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    # |rounded - w| is bitwise |w - rounded|; computed in the buffer of rounded.float() (one full-size temporary).
    metric = rounded.float().sub_(w).abs_().mul_(scaler.float().sqrt()[None, :])
    # The seed takes sorted_descending[int(numel * p - 1)] with Python indexing. The native O(numel)
    # selection marks the numel - pos - 1 smallest entries; the threshold is the least of the rest (no
    # sort, and none of kthvalue's full-size copies).
    numel = metric.numel()
    pos = int(numel * keep_proportion - 1)
    if pos < 0:
        pos += numel
    pos = min(pos, numel - 1)
    below = _ops.prune_mask(metric, numel - pos - 1)
    threshold = metric[~below].min()
    return metric >= threshold


def salience_mean(w: torch.Tensor, scaler: torch.Tensor) -> float:
    """The mean salience s_j·w² over the non-zero weights of w (read as float16), the rounding by salience's
    reference point; 0 for an all-zero weight."""
    half = w.to(torch.float16)
    return _mean(_salience(half, scaler[None, :]), half)


def salience_mantissa_bits(w: torch.Tensor, channel_scaler: torch.Tensor, level: float, mean: float) -> torch.Tensor:
    """Each weight's mantissa bits under rounding by salience (module docstring): round(level + ½·log2(s_j·w² /
    mean)), clamped to [1, 10], as int32; w read as float16, channel_scaler (s_j) broadcast against it."""
    return _bits(_salience(w, channel_scaler), level, mean)


def _salience(w: torch.Tensor, channel_scaler: torch.Tensor) -> torch.Tensor:
    return w.to(torch.float16).float().square_().mul_(channel_scaler.float())


def _mean(salience: torch.Tensor, half: torch.Tensor) -> float:
    """The mean of the salience over the non-zero entries of `half` (the weight as float16)."""
    return float(salience.sum(dtype=torch.float64)) / max(int(torch.count_nonzero(half)), 1)


def _bits(salience: torch.Tensor, level: float, mean: float) -> torch.Tensor:
    """salience_mantissa_bits from the salience (float32, overwritten)."""
    if not mean > 0:  # all zero (or no channel energy): nothing to rank, every weight at the level
        return torch.full(salience.shape, min(max(round(level), 1), 10), dtype=torch.int32, device=salience.device)
    return salience.div_(mean).clamp_(min=1e-30).log2_().mul_(0.5).add_(level).round_().clamp_(1, 10).to(torch.int32)


def round_to_bits(w: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """w rounded in float16, each weight to its own number of mantissa bits (1 to 10), half to even on the bit
    pattern; zero, subnormals, inf and NaN left as they are (every zero is +0.0), and a value that would round up
    to inf kept. One look-up in a table of every (bits, pattern) pair."""
    pattern = w.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    index = pattern.add_(bits.to(torch.int32) << 16)
    return _bits_table(w.device)[index].view(torch.float16)


@functools.lru_cache(maxsize=None)
def _bits_table(device: torch.device) -> torch.Tensor:
    """round_to_bits of all 65536 float16 patterns at 0 to 10 mantissa bits (as int16, 11 x 65536, flattened)."""
    pattern = torch.arange(1 << 16, dtype=torch.int32)
    sign, mag = pattern & _SIGN, pattern & _MAG
    exponent = mag >> 10
    rows = []
    for drop in range(10, -1, -1):  # bits 0..10
        if drop > 0:
            half, odd = 1 << (drop - 1), (mag >> drop) & 1
            rounded = ((mag + half - 1 + odd) >> drop) << drop
        else:
            rounded = mag
        rounded = torch.where((exponent == 0) | (exponent == 31) | (rounded >= _INF), mag, rounded)
        rows.append(torch.where(rounded == 0, 0, rounded | sign))
    return torch.cat(rows).to(torch.int16).to(device)


def round_by_salience(w: torch.Tensor, scaler: torch.Tensor, level: float) -> torch.Tensor:
    """w rounded in float16 by salience at `level` (module docstring), scaler: its input channels' mean squares."""
    half = w.to(torch.float16)
    salience = _salience(half, scaler[None, :])
    return round_to_bits(half, _bits(salience, level, _mean(salience, half)))


def apply_keepbits(w: torch.Tensor, scaler: torch.Tensor, keep_bits: int = 2, keep_proportion: float = 0.02,
                   salience_bits: float | None = None) -> torch.Tensor:
    """The final weight of the keep-bit rounding, cast back to w's dtype: SPEC §3's (rounded except at the keep
    mask), or by salience at level salience_bits when that is given (keep_bits and keep_proportion then unused)."""
    if salience_bits is not None:
        return round_by_salience(w, scaler, salience_bits).to(w.dtype)
    rounded = round_float16(w, None, keep_bits)
    keep = _keep_mask(w, rounded, scaler, keep_proportion)
    # The rounding is elementwise: redo only the kept few (keep_proportion) with their mantissa kept,
    # instead of a second pass over the whole weight.
    kept = w[keep]
    rounded[keep] = round_float16(kept, torch.ones(kept.shape, dtype=torch.bool, device=w.device), keep_bits)
    return rounded.to(w.dtype)
