"""Prune one nn.Linear: statistics (SPEC §1) → native ADMM (SPEC §2) → keep-bit rounding (SPEC §3)."""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import _ops
from . import device as devices
from .keepbits import apply_keepbits

# The seed's constants (KEEP_BITS, KEEP_PROPORTION, PERCDAMP, ITERATIVE_PRUNE, ITERS) and rho, and the
# mask structure ("unstructured": the seed's global selection; "per_row"; "N:M" such as "2:4").
# mode="quality" (admm_sparse.quality): ADMM until the mask settles + exact refit; its own knobs below, and
# percdamp 0.01 unless given (measured better than 0.1 there). round_in_admm None: on in quality mode when
# keep_bits is set; it rounds with error compensation on the solver's support (quality.round_with_feedback).
# allow_tf32: CUDA float32 GEMMs in TF32 (faster, less exact); off by default whatever torch's global setting.
# mode="fast" (admm_sparse.fast): the seed's ADMM over-relaxed, the mask re-chosen until it settles or for
# fast_mask_iters iterations, then 2 on that mask (prune_iters and iters are not used); every GEMM in bfloat16
# where that is faster (the returned weights stay float32).
DEFAULT_OPTIONS = dict(keep_bits=2, keep_proportion=0.02, salience_bits=None, percdamp=0.1, prune_iters=15, iters=20,
                       rho=1.0, mask_structure="unstructured", mode="seed", round_in_admm=None, quality_rho=0.1,
                       quality_max_iters=300, quality_check_every=3, refit_iters=200, allow_tf32=False,
                       fast_mask_iters=8)
QUALITY_PERCDAMP = 0.01
MODES = ("seed", "quality", "fast")
DEFAULT_SPARSE_RATIO = 0.3
MAX_GROUP = 64  # largest M of an "N:M" structure (csrc/admm.h kMaxGroupSize)


@dataclass
class PruneReport:
    shape: tuple[int, int]  # (out_features, in_features)
    sparse_ratio: float
    sparsity: float  # achieved fraction of exact zeros in the new weight
    relative_error: float  # ||X (W - W0)ᵀ|| / ||X W0ᵀ|| over the calibration inputs
    seconds: float
    damping: float  # added to the normalised Hessian's diagonal (percdamp · mean, plus any retry)
    tokens: int
    mode: str = "seed"
    mask_structure: str = "unstructured"
    keep_bits: int | None = None  # the keep-bit rounding's mantissa bits (None: none)
    keep_proportion: float | None = None  # and the fraction of weights it left whole
    salience_bits: float | None = None  # rounding by salience instead (keepbits.round_by_salience): its level
    # quality and fast mode: ADMM iterations; quality mode only: final rho, relative output error (before
    # keep-bit rounding) of the ADMM's projected iterate and after the refit on its support.
    # round_in_admm only: relative output error of the solver's weight before it was rounded.
    iterations: int | None = None
    final_rho: float | None = None
    error_before_refit: float | None = None
    error_after_refit: float | None = None
    error_before_rounding: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# Dense targets' least-squares damping, relative to each input channel's energy (diag H).
DENSE_TARGET_DAMPING = 0.01
# Columns of X_prunedᵀ X_dense computed per float32 GEMM before their float64 add (bounds the temporary).
CROSS_PANEL = 1024


def parse_mask_structure(structure) -> tuple[str, int, int]:
    """"unstructured" / "per_row" -> (name, 0, 0); "N:M" -> ("N:M", N, M) with 1 <= N <= M <= 64."""
    if structure in ("unstructured", "per_row"):
        return structure, 0, 0
    parts = structure.split(":") if isinstance(structure, str) else []
    if len(parts) == 2 and all(p.isdigit() and len(p) <= 3 for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 1 <= n <= m <= MAX_GROUP:
            return "N:M", n, m
    raise ValueError(f"mask_structure must be \"unstructured\", \"per_row\" or \"N:M\" with 1 <= N <= M <= {MAX_GROUP} "
                     f"(e.g. \"2:4\"), got {structure!r}")


def resolve_sparse_ratio(sparse_ratio, structure) -> float:
    """The ratio to prune: an "N:M" structure fixes it at 1 - N/M (sparse_ratio must then be None or equal to
    it); otherwise sparse_ratio, None meaning the seed's 0.3."""
    kind, n, m = parse_mask_structure(structure)
    if kind != "N:M":
        return check_sparse_ratio(DEFAULT_SPARSE_RATIO if sparse_ratio is None else sparse_ratio)
    implied = 1.0 - n / m
    if sparse_ratio is not None:
        sparse_ratio = check_sparse_ratio(sparse_ratio)
        if abs(sparse_ratio - implied) > 1e-9:
            raise ValueError(f"mask_structure {structure!r} prunes {m - n} of every {m} weights (sparse_ratio "
                             f"{implied:g}); sparse_ratio={sparse_ratio:g} contradicts it: pass sparse_ratio=None or "
                             f"{implied:g}")
    return implied


def native_structure(structure) -> str:
    """The structure string of the native admm_prune (N:M normalised, e.g. "02:4" -> "2:4")."""
    kind, n, m = parse_mask_structure(structure)
    return f"{n}:{m}" if kind == "N:M" else kind


def check_structure_fits(structure, shape) -> None:
    kind, n, m = parse_mask_structure(structure)
    if kind == "N:M" and shape[1] % m != 0:
        raise ValueError(f"mask_structure {structure!r} needs in_features divisible by {m}; this layer's weight has "
                         f"shape {tuple(shape)} (out_features, in_features)")


def pruned_count(shape, sparse_ratio: float, structure) -> int:
    """How many weights the structure prunes: unstructured int(numel·r); per_row int(d_in·r) in every row;
    N:M (M - N) in every group of M."""
    rows, cols = shape
    kind, n, m = parse_mask_structure(structure)
    if kind == "unstructured":
        return int(rows * cols * sparse_ratio)
    if kind == "per_row":
        return rows * int(cols * sparse_ratio)
    return rows * (cols // m) * (m - n)


def check_sparse_ratio(sparse_ratio) -> float:
    if isinstance(sparse_ratio, bool) or not isinstance(sparse_ratio, (int, float)):
        raise TypeError(f"sparse_ratio must be a number in [0, 1), got {sparse_ratio!r}")
    if not 0.0 <= sparse_ratio < 1.0:  # also false for NaN
        raise ValueError(f"sparse_ratio must be in [0, 1), got {sparse_ratio}; e.g. 0.3 zeroes 30% of the weights")
    return float(sparse_ratio)


def check_options(options: dict) -> dict:
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; known: {sorted(DEFAULT_OPTIONS)}")
    opts = {**DEFAULT_OPTIONS, **options}
    kb = opts["keep_bits"]
    if kb is not None and (isinstance(kb, bool) or not isinstance(kb, int) or not 0 <= kb <= 10):
        raise ValueError(f"keep_bits must be an int in [0, 10] or None (no rounding), got {kb!r}")
    if not 0.0 <= opts["keep_proportion"] <= 1.0:
        raise ValueError(f"keep_proportion must be in [0, 1], got {opts['keep_proportion']}")
    sb = opts["salience_bits"]
    if sb is not None:
        if isinstance(sb, bool) or not isinstance(sb, (int, float)) or not 0 <= sb <= 10:
            raise ValueError(f"salience_bits must be a number in [0, 10] (the mantissa bits of a weight of mean "
                             f"salience, such as 1.25) or None (the SPEC's keep-bit rounding), got {sb!r}")
        if kb is None:
            raise ValueError("salience_bits is a way of keep-bit rounding, which keep_bits=None turns off; pass "
                             "keep_bits (any value: rounding by salience replaces it) or leave salience_bits unset")
    if not (math.isfinite(opts["percdamp"]) and opts["percdamp"] >= 0):
        raise ValueError(f"percdamp must be finite and >= 0, got {opts['percdamp']}")
    if not (math.isfinite(opts["rho"]) and opts["rho"] > 0):
        raise ValueError(f"rho must be finite and > 0, got {opts['rho']}")
    if not (isinstance(opts["iters"], int) and isinstance(opts["prune_iters"], int)
            and 1 <= opts["prune_iters"] <= opts["iters"]):
        raise ValueError(f"need integers 1 <= prune_iters <= iters, got prune_iters={opts['prune_iters']}, "
                         f"iters={opts['iters']}")
    parse_mask_structure(opts["mask_structure"])
    if opts["mode"] not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {opts['mode']!r}")
    if opts["round_in_admm"] is not None and not isinstance(opts["round_in_admm"], bool):
        raise ValueError(f"round_in_admm must be True, False or None (auto), got {opts['round_in_admm']!r}")
    if not isinstance(opts["allow_tf32"], bool):
        raise ValueError(f"allow_tf32 must be True or False, got {opts['allow_tf32']!r}")
    if opts["round_in_admm"] and opts["keep_bits"] is None:
        raise ValueError("round_in_admm=True needs keep_bits (it rounds to the keep-bit grid)")
    for name in ("quality_max_iters", "quality_check_every", "refit_iters", "fast_mask_iters"):
        v = opts[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "refit_iters" else 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not (math.isfinite(opts["quality_rho"]) and opts["quality_rho"] > 0):
        raise ValueError(f"quality_rho must be finite and > 0, got {opts['quality_rho']}")
    if opts["mode"] == "fast" and opts["round_in_admm"]:
        raise ValueError("round_in_admm=True is not supported with mode=\"fast\" (its compensation costs more than "
                         "fast mode saves); use mode=\"seed\" or \"quality\"")
    if opts["mode"] == "quality" and "percdamp" not in options:
        opts["percdamp"] = QUALITY_PERCDAMP
    if opts["round_in_admm"] is None:
        opts["round_in_admm"] = opts["mode"] == "quality" and opts["keep_bits"] is not None
    return opts


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in t. A finite sum proves it (NaN and inf survive any addition) in one fast reduction;
    only a sum that is not finite (a non-finite entry, or an overflow) needs the elementwise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not all_finite(t):
        raise ValueError(f"{what} contains NaN or inf; clean it (or the model producing it) before pruning")


class AdmmPruner:
    """The seed tool's class: add_batch() the layer's inputs, then fasterprune(sparse_ratio).

    Options given here (see fasterprune) are the defaults of this pruner's fasterprune calls.

    Statistics are kept as float64 sums on the layer's device (hessian_sum, square_sum, cross_sum and the
    counts nsamples, tokens), so that they are plain sums: summed over processes in any split of the batches
    they give the same values (see distributed.sum_statistics). Each batch's products are float32 GEMMs; only
    their sum is float64, rounded once to float32 when the statistics are first read (H, scaler, cross),
    which ends the accumulation. The Hessian keeps only its lower triangle (the upper one is never read).
    """

    def __init__(self, layer: nn.Module, **options):
        self.allow_tf32 = check_options(options)["allow_tf32"]  # for add_batch's statistics GEMMs
        self.options = options
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise TypeError(f"AdmmPruner prunes an nn.Linear (or any layer whose .weight is a floating "
                            f"[out_features, in_features] matrix), got {type(layer).__name__}")
        if layer.weight.numel() == 0:
            raise ValueError(f"cannot prune an empty layer of shape {tuple(layer.weight.shape)}")
        _check_finite(layer.weight.detach(), "the layer's weight")
        self.layer = layer
        self.rows, self.columns = layer.weight.shape
        self.device = layer.weight.device
        sums = devices.statistics_device(self.device)  # the CPU for a device without float64
        self.hessian_sum = torch.zeros(self.columns, self.columns, dtype=torch.float64, device=sums)
        self.square_sum = torch.zeros(self.columns, dtype=torch.float64, device=sums)
        self.cross_sum = None  # dense targets: sum of X_prunedᵀ X_dense (add_cross), when the block loop feeds it
        self.nsamples = 0  # sequences seen (SPEC §1's n)
        self.tokens = 0
        self._final = None  # (H, scaler, cross) in float32 once read; None while accumulating or freed
        self.freed = False
        self.factors: dict = {}  # factorisations of the final statistics, shared with share_statistics' followers
        self.dense_blend = 1.0  # the target: dense_blend · dense model's output + (1 - dense_blend) · this input's
        self.split_group = None  # a distributed.Group whose ranks share this layer's seed-mode ADMM (admm_sparse.split)

    def _statistics(self) -> tuple:
        """(H, scaler, cross) in float32: the sums rounded once, on the first call; the sums are then released."""
        if self._final is None and not self.freed:
            cross = None if self.cross_sum is None else self.cross_sum.to(self.device, torch.float32)
            self._final = (self.hessian_sum.to(self.device, torch.float32),
                           (self.square_sum / max(self.nsamples, 1)).to(self.device, torch.float32), cross)
            self.hessian_sum = self.square_sum = self.cross_sum = None
        return self._final or (None, None, None)

    @property
    def H(self) -> torch.Tensor | None:
        """The Hessian Σ XᵀX (lower triangle), float32; None once freed."""
        return self._statistics()[0]

    @property
    def scaler(self) -> torch.Tensor | None:
        """Per input channel, the mean over sequences of Σ x² (SPEC §1's running mean), float32."""
        return self._statistics()[1]

    @property
    def cross(self) -> torch.Tensor | None:
        """Dense targets' Σ X_prunedᵀ X_dense, float32 (None without dense targets)."""
        return self._statistics()[2]

    def _check_accumulating(self) -> None:
        if self.freed:
            raise RuntimeError("this AdmmPruner was freed; create a new one")
        if self._final is not None:
            raise RuntimeError("this AdmmPruner's statistics are final once read (pruned, shared or inspected); "
                               "add every batch before that, or create a new AdmmPruner")

    def share_statistics(self, leader: "AdmmPruner") -> None:
        """Take the statistics `leader` accumulated as this layer's own (same Hessian tensor, no copy): layers
        that read the same inputs (q/k/v, gate/up) need them accumulated only once. Call after the last
        leader.add_batch."""
        if leader.columns != self.columns:
            raise ValueError(f"cannot share statistics of a layer with {leader.columns} inputs with one of "
                             f"{self.columns}")
        self.hessian_sum = self.square_sum = self.cross_sum = None
        self._final, self.nsamples, self.tokens = leader._statistics(), leader.nsamples, leader.tokens
        self.factors = leader.factors

    def add_statistics(self, other: "AdmmPruner", weight: float) -> None:
        """Add weight x other's statistics (Hessian, and the scaler as a weighted mean) to this layer's: a prior
        for a layer that saw too few tokens of its own (a rarely routed expert)."""
        if other.columns != self.columns:
            raise ValueError(f"cannot add statistics of a layer with {other.columns} inputs to one of {self.columns}")
        self._check_accumulating()
        self.hessian_sum.add_(other.H, alpha=weight)
        self.square_sum.add_(other.scaler.double() * other.nsamples, alpha=weight)
        self.nsamples += weight * other.nsamples
        self.tokens += round(weight * other.tokens)

    def add_cross(self, inp: torch.Tensor, dense_inp: torch.Tensor) -> None:
        """Dense targets: accumulate X_prunedᵀ X_dense from this batch's input (the one add_batch gets) and the
        dense model's input to the same layer for the same tokens. fasterprune then fits the dense model's output
        W·X_dense instead of the layer's own W·X_pruned (see dense_target)."""
        if inp.shape != dense_inp.shape:
            raise ValueError(f"dense targets need the pruned and the dense model's inputs for the same tokens; got "
                             f"shapes {tuple(inp.shape)} and {tuple(dense_inp.shape)}")
        self._check_accumulating()
        x, xd = (t.reshape(-1, self.columns).to(self.device, torch.float32) for t in (inp, dense_inp))
        if self.cross_sum is None:
            self.cross_sum = torch.zeros_like(self.hessian_sum)
        for c0 in range(0, self.columns, CROSS_PANEL):  # a batch's float32 product, a panel at a time
            self.cross_sum[:, c0:c0 + CROSS_PANEL].add_((x.T @ xd[:, c0:c0 + CROSS_PANEL]).to(self.cross_sum.device))

    def dense_target(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight whose output on the pruned inputs best fits the blended target (least squares, damped):
        W + blend · W (C - H)ᵀ (H + DENSE_TARGET_DAMPING·diag(H))⁻¹ with C = Σ X_prunedᵀ X_dense. Minimising
        ||(target - W') X_prunedᵀ|| over sparse W' (what the ADMM does) then minimises
        ||W X_denseᵀ - W' X_prunedᵀ||. When the two streams are equal (C = H) it is W itself, exactly."""
        if self.cross is None or self.dense_blend == 0:
            return weight
        key = ("dense_target", DENSE_TARGET_DAMPING)
        if key not in self.factors:  # once per input: q/k/v share it
            h = self.H.tril() + self.H.tril(-1).T
            diag = h.diagonal().clone()
            factor, info = torch.linalg.cholesky_ex(h + torch.diag(DENSE_TARGET_DAMPING * diag + (diag == 0).float()))
            if int(info) != 0:
                raise ValueError("dense targets: the calibration inputs' statistics are not positive definite even "
                                 "damped; use more calibration data or turn dense_targets off")
            self.factors[key] = (self.cross - h, factor)
        cross_minus_h, factor = self.factors[key]
        w = weight.float()
        correction = torch.cholesky_solve((w @ cross_minus_h.T).T, factor).T  # zero when the streams are equal
        return (w + self.dense_blend * correction).to(weight.dtype)

    def add_batch(self, inp: torch.Tensor) -> None:
        self._check_accumulating()
        if not isinstance(inp, torch.Tensor) or not inp.is_floating_point():
            raise TypeError(f"calibration input must be a floating tensor, got {type(inp).__name__}"
                            + (f" of {inp.dtype}" if isinstance(inp, torch.Tensor) else ""))
        if inp.dim() == 0 or inp.shape[-1] != self.columns:
            raise ValueError(f"calibration input's last dimension must be in_features={self.columns}, "
                             f"got shape {tuple(inp.shape)}")
        if inp.numel() == 0:
            raise ValueError(f"calibration input of shape {tuple(inp.shape)} holds no tokens")
        _check_finite(inp, "the calibration input")
        with devices.float32_matmuls(self.allow_tf32):
            _ops.accumulate_sums(self.hessian_sum, self.square_sum, inp.to(self.device))
        self.nsamples += inp.shape[0] if inp.dim() >= 3 else 1
        self.tokens += inp.numel() // self.columns

    def can_split(self) -> bool:
        """Whether this pruner's ADMM can be split over ranks by output rows (split_group): seed mode, rounding
        after it."""
        opts = check_options(self.options)
        return opts["mode"] == "seed" and not opts["round_in_admm"]

    def fasterprune(self, sparse_ratio: float | None = None, **options) -> PruneReport:
        """Prune the layer's weight in place; options: keep_bits, keep_proportion, percdamp, prune_iters,
        iters, rho, mask_structure, mode, round_in_admm, allow_tf32 and quality mode's knobs (defaults in
        DEFAULT_OPTIONS: the seed's). sparse_ratio None means 0.3, or
        1 - N/M for an "N:M" mask_structure (which an explicit sparse_ratio must then equal)."""
        opts = check_options({**self.options, **options})
        structure = opts["mask_structure"]
        sparse_ratio = resolve_sparse_ratio(sparse_ratio, structure)
        check_structure_fits(structure, (self.rows, self.columns))
        if self.freed:
            raise RuntimeError("this AdmmPruner was freed; create a new one")
        if self.tokens == 0:
            raise RuntimeError("fasterprune() needs calibration statistics: call add_batch(inputs) first")
        weight = self.layer.weight
        _check_finite(weight.detach(), "the layer's weight")
        if self.tokens < self.columns:
            warnings.warn(f"only {self.tokens} calibration tokens for a layer with {self.columns} inputs: the "
                          "Hessian is singular and damping carries the result; use more calibration data",
                          stacklevel=2)
        start = time.perf_counter()
        old = self.dense_target(weight.detach())  # the weight itself unless the loop fed dense targets
        k = pruned_count((self.rows, self.columns), sparse_ratio, structure)
        with devices.float32_matmuls(opts["allow_tf32"]), devices.no_autocast(weight.device):
            new, damping, dense_energy, extra = self._prune(old, k, structure, opts)
            delta_energy = quadratic_trace(self.H, new.float() - old.float(), dtype=self._trace_dtype(opts))
        weight.data.copy_(new)
        devices.synchronize(weight.device)
        seconds = time.perf_counter() - start
        dense = dense_energy.item()
        return PruneReport(
            shape=(self.rows, self.columns),
            sparse_ratio=sparse_ratio,
            sparsity=(new.numel() - torch.count_nonzero(new).item()) / new.numel(),
            relative_error=math.sqrt(max(delta_energy, 0.0) / dense) if dense > 0 else 0.0,
            seconds=seconds,
            damping=float(damping.sum()),
            tokens=self.tokens,
            mode=opts["mode"],
            mask_structure=structure,
            keep_bits=opts["keep_bits"],
            keep_proportion=None if opts["keep_bits"] is None or opts["salience_bits"] is not None
            else opts["keep_proportion"],
            salience_bits=None if opts["keep_bits"] is None else opts["salience_bits"],
            **extra,
        )

    def _prune(self, old: torch.Tensor, k: int, structure: str, opts: dict):
        """The new weight (old's dtype), dampings, dense output energy and quality-mode report fields."""
        extra = {}
        if opts["mode"] == "seed" and not opts["round_in_admm"]:
            args = (self.H, old.float(), k, opts["percdamp"], opts["rho"], opts["iters"], opts["prune_iters"],
                    native_structure(structure))
            if self.split_group is None:
                pruned, damping, dense_energy = _ops.admm_prune(*args)
            else:  # this rank iterates its share of the output rows; every rank gets the whole weight
                from .split import admm_prune_split

                pruned, damping, dense_energy = admm_prune_split(*args, self.split_group)
            new = pruned.to(old.dtype)
        elif opts["mode"] == "fast":
            new, damping, dense_energy, extra = self._prune_fast(old, k, structure, opts)
        else:
            new, damping, dense_energy, extra = self._prune_quality(old, k, structure, opts)
        if opts["keep_bits"] is not None and not opts["round_in_admm"]:
            if not all_finite(new.to(torch.float16)):
                raise ValueError("the pruned weight has values beyond float16's range, which keep-bit rounding "
                                 "(float16 for the Atlas card) cannot represent; pass keep_bits=None")
            new = apply_keepbits(new, self.scaler, opts["keep_bits"], opts["keep_proportion"], opts["salience_bits"])
        return new, damping, dense_energy, extra

    def _prune_fast(self, old: torch.Tensor, k: int, structure: str, opts: dict):
        """Fast mode: see admm_sparse.fast."""
        from . import fast

        key = ("fast", opts["percdamp"], opts["rho"], devices.gemm_dtype(old.device))
        if key not in self.factors:
            self.factors[key] = fast.factor(self.H, *key[1:])
        pruned, damping, iterations = fast.admm_fast(self.factors[key], old.float(), k,
                                                     parse_mask_structure(structure), opts["rho"],
                                                     opts["fast_mask_iters"])
        if not all_finite(pruned):
            raise ValueError("fast-mode pruning produced non-finite weights; check the calibration data")
        dense = torch.tensor(quadratic_trace(self.H, old.float(), dtype=self._trace_dtype(opts)))
        return pruned.to(old.dtype), damping, dense, dict(iterations=iterations)

    def _trace_dtype(self, opts: dict) -> torch.dtype | None:
        """The report's traces' GEMM dtype: fast mode's own (bfloat16 where faster), else float32."""
        return devices.gemm_dtype(self.H.device) if opts["mode"] == "fast" else None

    def _prune_quality(self, old: torch.Tensor, k: int, structure: str, opts: dict):
        """Quality mode (and/or rounding inside ADMM): see admm_sparse.quality."""
        from . import quality

        parsed = parse_mask_structure(structure)
        if opts["mode"] == "seed":  # the seed's ADMM, then rounding with compensation on its support
            seed_w, _, _ = _ops.admm_prune(self.H, old.float(), k, opts["percdamp"], opts["rho"], opts["iters"],
                                           opts["prune_iters"], native_structure(structure))
            ctx = quality.make_context(self.H, old.float(), opts["percdamp"])
            ctx["rho"] = opts["rho"]
            wn = (seed_w * ctx["d"]).T.contiguous()
            pruned = wn == 0
            err = quality.relative_error(ctx["hn"], wn - ctx["wn0"], ctx["dense"])
            info = quality.QualityInfo(opts["iters"], opts["rho"], err, err)
        else:
            # The seed's 20 iterations as a second candidate support: quality mode is never worse than seed.
            seed_w, _, _ = _ops.admm_prune(self.H, old.float(), k, DEFAULT_OPTIONS["percdamp"], opts["rho"],
                                           opts["iters"], opts["prune_iters"], native_structure(structure))
            wn, pruned, ctx, info = quality.admm_quality(
                self.H, old.float(), k, parsed, opts["percdamp"], opts["quality_rho"], opts["quality_max_iters"],
                opts["quality_check_every"], opts["refit_iters"], seed_candidate=seed_w)
        error_before_rounding = None
        if opts["round_in_admm"]:
            if not all_finite((wn.T / ctx["d"]).to(torch.float16)):
                raise ValueError("the pruned weight has values beyond float16's range, which keep-bit rounding "
                                 "(float16 for the Atlas card) cannot represent; pass keep_bits=None")
            salience = None if opts["salience_bits"] is None else (self.scaler, opts["salience_bits"])
            w = quality.round_with_feedback(wn, pruned, ctx, opts["keep_bits"], opts["keep_proportion"],
                                            opts["refit_iters"], salience=salience)
            new = w.to(old.dtype)
            error_before_rounding = info.error_after_refit
        else:
            new = (wn.T / ctx["d"]).to(old.dtype)
        if not all_finite(new):
            raise ValueError("quality-mode pruning produced non-finite weights; check the calibration data")
        damping = torch.tensor([ctx["damping"], 0.0])
        dense = torch.tensor(ctx["dense"] * 1.0)
        extra = dict(iterations=info.iterations, final_rho=info.final_rho,
                     error_before_refit=info.error_before_refit, error_after_refit=info.error_after_refit,
                     error_before_rounding=error_before_rounding)
        return new, damping, dense, extra

    def free(self) -> None:
        self.freed = True
        self.hessian_sum = self.square_sum = self.cross_sum = self._final = None
        self.factors = {}  # a new dict: followers still pruning keep the shared one


def quadratic_trace(h_lower: torch.Tensor, a: torch.Tensor, block: int = 512, dtype: torch.dtype | None = None
                    ) -> float:
    """tr(A H Aᵀ) for the symmetric H given by its lower triangle L (the upper one is never read):
    2·tr(A L Aᵀ) − Σ diag(H)·colsum(A²), over blocks of L's columns. Only the lower triangle is multiplied
    (half a GEMM) and no d_in x d_in temporary is made. dtype: the GEMMs' (default A's); fast mode passes its
    bfloat16 where that is faster (the report's traces were 8-28% of its time in float32): the products are
    then rounded to bfloat16 (inputs and products: a few 2^-9 relative each, unbiased, so the trace's relative
    error stays below 1% and shrinks as its terms average out), everything after them float32 / float64."""
    n = h_lower.shape[0]
    low = a if dtype is None else a.to(dtype)
    left = torch.zeros((), dtype=torch.float64, device=a.device)
    diag = torch.zeros((), dtype=torch.float64, device=a.device)
    for c0 in range(0, n, block):
        c1 = min(c0 + block, n)
        a_block = a[:, c0:c1]
        part = low[:, c0:c1] @ h_lower[c0:c1, c0:c1].tril().to(low.dtype)  # the diagonal block's lower triangle
        if c1 < n:
            part.addmm_(low[:, c1:], h_lower[c1:, c0:c1].to(low.dtype))  # the column block below it
        left += part.float().mul_(a_block).sum(dtype=torch.float64)
        diag += (h_lower.diagonal()[c0:c1].double() * a_block.square().sum(0, dtype=torch.float64)).sum()
    return (2 * left - diag).item()


def prune_linear(layer: nn.Module, X, sparse_ratio: float | None = None, **options) -> PruneReport:
    """Prune `layer` in place from calibration inputs X: a [..., in_features] tensor, or an iterable of them.
    sparse_ratio: None means the seed's 0.3, or 1 - N/M for mask_structure="N:M" (an explicit value must then
    equal 1 - N/M). Returns a PruneReport (achieved sparsity, relative output error on X, seconds, damping)."""
    opts = check_options(options)
    resolve_sparse_ratio(sparse_ratio, opts["mask_structure"])
    pruner = AdmmPruner(layer, **options)
    check_structure_fits(opts["mask_structure"], (pruner.rows, pruner.columns))
    batches: Iterable[torch.Tensor] = [X] if isinstance(X, torch.Tensor) else X
    for inp in batches:
        pruner.add_batch(inp)
    try:
        return pruner.fasterprune(sparse_ratio)
    finally:
        pruner.free()
