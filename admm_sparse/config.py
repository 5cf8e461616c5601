"""The float_sparse processor config (SPEC §4): a YAML file of the original tool's shape, or FloatSparseConfig.

```yaml
spec:
  process:
    - type: "float_sparse"
      sparse_ratio: 0.3        # 0.0 <= ratio < 1.0
      include: ["*"]           # shell-style wildcards on full module names
      exclude: ["*self_attn*"] # exclude wins over include
      # admm_sparse's extensions (the original tool has none of these; the defaults are the seed's):
      mask_structure: "unstructured"  # or "per_row", or "N:M" such as "2:4" (sparse_ratio is then 1 - N/M)
      mode: "seed"                    # or "quality": ADMM until the mask settles, then an exact refit;
                                      # or "fast": the seed's accuracy in fewer, cheaper iterations
      round_in_admm: null             # keep-bit rounding with compensation; null = on in quality mode only
      allow_tf32: false               # CUDA float32 GEMMs in TF32 (faster, less exact)
      calibration_dtype: "auto"       # the calibration forwards' dtype: model, bfloat16, float16, or auto
                                      # (bfloat16 in fast mode where bfloat16 GEMMs are faster, else the model's)
      keep_bits: 2                    # mantissa bits the keep-bit rounding keeps (SPEC §3); null: no rounding
      keep_proportion: 0.02           # fraction of the weights whose mantissa it leaves whole (most moved first)
      salience_bits: null             # or a level such as 1.25: each weight's mantissa bits by its salience
                                      # instead (replaces keep_bits' grid and keep_proportion); see keepbits.py
      reconstruct_epochs: 0           # block reconstruction after each block's pruning (0: off); see reconstruct.py
      reconstruct_lr: 0.003           # its Adam step, relative to each layer's kept weights' RMS
      reconstruct_dtype: "model"      # or "bfloat16": its forwards and backwards in bfloat16 autocast
      reconstruct_schedule: "constant" # or "cosine": its learning rate decayed to 0 over the epochs
      reconstruct_unit: "block"       # or "sub-block": attention, then MLP, each fitted to its dense output
      distill_epochs: 0               # after the loop, the whole pruned model fitted to the dense model's
                                      # next-token distributions (0: off); see distill.py
      distill_lr: 0.0003              # its Adam step, relative to each layer's kept weights' RMS
      distill_samples: 0              # windows sampled from the dense model, fitted beside the calibration ones
      distill_schedule: "constant"    # or "cosine": its learning rate decayed to 0 over the epochs
      dense_targets: 0.0              # fit the dense model's outputs (1), the layer's own (0), or a blend
      sequential: false               # prune a block's layers group by group in data-flow order
      stream_memory: "device"         # or "host": the loop's hidden-state streams in host memory (README "Memory")
      allocation: "uniform"           # or "error": per-layer ratios by measured error, same total (unstructured)
      target_bits_per_weight: null    # a size budget: each layer's ratio and keep_bits chosen to meet it (no
                                      # sparse_ratio then; unstructured); see budget.py
```
Every mistake is a ConfigError naming the file and the key.

OPTIONS declares every processor option once (name, default, one-line doc, how a command-line string
reads, who reads it, its check); the YAML keys, the `admm-sparse prune` flags (--sparse-ratio, --keep-bits, ...)
and FloatSparseConfig's keyword arguments all come from it, and the checks run in one place
(FloatSparseConfig.__post_init__: each option's own check, layer.check_options for the pruner's). The pruner's
options reach each layer's pruner (pruner_options); the loop's (calibration_dtype, reconstruct_*, distill_*,
dense_targets, sequential, stream_memory, allocation) the block loop only. PLACEMENT_OPTIONS say where the work happens, not
what it computes: a resumed run may change them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import yaml

PROCESSOR_TYPE = "float_sparse"
# Descriptive top-level keys of the original tool's files; accepted and ignored.
_IGNORED_TOP_KEYS = {"apiversion", "metadata"}


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null", "off") else int(text)


@dataclass(frozen=True)
class Option:
    """One processor option: its name (YAML key, keyword argument; the flag is --name-with-dashes), default,
    one-line doc, how a command-line string reads (None: a --flag / --no-flag switch; "list": several words),
    who reads it ("select": which layers and how many zeros; "pruner": each layer's pruner, checked by
    layer.check_options; "loop": the block loop) and, for the others, its check(value, name) -> value."""

    name: str
    default: object
    doc: str
    parse: Callable[[str], object] | str | None
    scope: str = "pruner"
    check: Callable[[object, str], object] | None = None


class ConfigError(ValueError):
    """A config that does not follow SPEC §4; the message names the file and the key."""


def _check_patterns(value, where: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{where}: expected a list of strings such as [\"*mlp*\"], got {value!r}")
    return list(value)


def _check_ratio(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number from 0.0 up to (not including) 1.0, got {value!r}")
    if not 0.0 <= value < 1.0:  # 1.0 would zero every weight
        raise ConfigError(f"{where}: must be from 0.0 up to (not including) 1.0, got {value}; 0.3 is the usual start")
    return float(value)


def _check_whole(what: str):
    def check(value, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: expected a whole number of {what} >= 0 (0: off), got {value!r}")
        return value
    return check


def _check_choice(choices):
    def check(value, where: str):
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r}")
        return value
    return check


def _check_bool(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _check_optional_ratio(value, where: str) -> float | None:
    return None if value is None else _check_ratio(value, where)


def _check_fraction(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{where}: expected a number from 0 to 1, got {value!r}")
    return float(value)


def _check_bits_per_weight(value, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 16:
        raise ConfigError(f"{where}: expected compressed bits per weight, more than 0 and at most 16 (float16), such as "
                          f"4.0, or null for no budget; got {value!r}")
    return float(value)


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "null", "off") else float(text)


def _check_lr(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ConfigError(f"{where}: expected a learning rate > 0 such as 0.003, got {value!r}")
    return float(value)


CALIBRATION_DTYPES = ("auto", "model", "bfloat16", "float16")
ALLOCATIONS = ("uniform", "error")
RECONSTRUCT_DTYPES = ("model", "bfloat16")
RECONSTRUCT_UNITS = ("block", "sub-block")
SCHEDULES = ("constant", "cosine")  # a fit's learning rate over its steps (fit.fit)
STREAM_MEMORIES = ("device", "host")

OPTIONS = (
    Option("sparse_ratio", None, "fraction of the selected weights to prune, 0 <= r < 1 (default 0.3; 1 - N/M for an "
           "N:M structure)", float, "select", _check_optional_ratio),
    Option("include", ["*"], "wildcards on full layer names to prune (default *)", "list", "select", _check_patterns),
    Option("exclude", [], "wildcards on full layer names to leave dense; they win over include", "list", "select",
           _check_patterns),
    Option("mask_structure", "unstructured", "unstructured, per_row, or N:M such as 2:4 (sparsity 1 - N/M)", str),
    Option("mode", "seed", "seed (the original algorithm), quality (ADMM until the mask settles, then an exact "
           "refit; slower) or fast (the seed's ADMM over-relaxed, stopped once the mask settles, its GEMMs in "
           "bfloat16 where faster; about a third of seed mode's time, 2-3.5x a SparseGPT's: benchmarks/RESULTS.md)",
           str),
    Option("round_in_admm", None, "keep-bit rounding with error compensation inside the solver instead of after it "
           "(default: on in quality mode only)", None),
    Option("allow_tf32", False, "on a GPU, float32 GEMMs in TF32: faster, less exact", None),
    Option("calibration_dtype", "auto", "dtype of the calibration forwards (statistics and the next block's inputs): "
           "model (the model's own), bfloat16 (autocast: faster, less exact), float16 (autocast, for devices without "
           "bfloat16 such as the Atlas card; an overflow is an error naming the block), or auto: bfloat16 in fast "
           "mode where bfloat16 GEMMs are faster on the device, else the model's", str, "loop", _check_choice(CALIBRATION_DTYPES)),
    Option("keep_bits", 2, "mantissa bits kept by the keep-bit rounding for the Atlas card's compression "
           "(SPEC §3); none: no rounding", _optional_int),
    Option("keep_proportion", 0.02, "fraction of the weights whose float16 mantissa the keep-bit rounding leaves whole: "
           "those it would move most, weighted by their input channel's RMS (SPEC §3's 0.02)", float),
    Option("salience_bits", None, "keep-bit rounding by salience instead of SPEC §3's grid: each weight keeps "
           "round(level + log2(its salience / the layer's mean) / 2) mantissa bits, 1 to 10 (salience: its input "
           "channel's mean square times its square); the level is the bits of a weight of mean salience, such as 1.0 "
           "(see keepbits.py); none: the SPEC's rounding", _optional_float),
    Option("reconstruct_epochs", 0, "block reconstruction: after a block is pruned, at most this many epochs of Adam "
           "over its kept weights (masks fixed) to reproduce the dense model's block outputs, stopped early on "
           "held-out calibration windows (0: off)", int, "loop", _check_whole("epochs")),
    Option("reconstruct_lr", 3e-3, "block reconstruction's Adam learning rate, relative to each layer's kept weights' "
           "RMS (default 3e-3)", float, "loop", _check_lr),
    Option("reconstruct_dtype", "model", "block reconstruction's and distillation's fitting forwards and backwards: "
           "model (the model's "
           "dtype) or bfloat16 (autocast: faster where bfloat16 GEMMs are; the kept epoch is still chosen in the "
           "model's dtype)", str, "loop", _check_choice(RECONSTRUCT_DTYPES)),
    Option("reconstruct_schedule", "constant", "block reconstruction's learning rate over the fit: constant, or cosine "
           "(decayed from reconstruct_lr to 0 over reconstruct_epochs epochs, a half cosine per step)", str, "loop",
           _check_choice(SCHEDULES)),
    Option("reconstruct_unit", "block", "what block reconstruction fits at once: block (the whole block to the dense "
           "block's output) or sub-block (the attention side to the dense residual stream between attention and MLP, "
           "then the MLP side to the dense block's output; the split found from the block's data flow, the whole "
           "block where there is none, as with attention and MLP in parallel)", str, "loop",
           _check_choice(RECONSTRUCT_UNITS)),
    Option("distill_epochs", 0, "distillation: once every block is pruned, at most this many epochs of Adam over "
           "the kept weights of all pruned layers together (masks fixed) so that the model's next-token distributions "
           "match the dense model's (KL divergence), stopped early on held-out calibration windows; needs the model "
           "in memory (a safetensors folder is then loaded whole, not streamed) and one process (0: off)", int, "loop",
           _check_whole("epochs")),
    Option("distill_lr", 3e-4, "distillation's Adam learning rate, relative to each layer's kept weights' RMS "
           "(default 3e-4)", float, "loop", _check_lr),
    Option("distill_samples", 0, "distillation: this many token windows sampled from the dense model before pruning "
           "(each continuing the first 16 tokens of a fitted calibration window, as long as a calibration window) and "
           "fitted beside the calibration windows, more text to match the dense distributions on (0: off)", int,
           "loop", _check_whole("windows")),
    Option("distill_schedule", "constant", "distillation's learning rate over the fit: constant, or cosine (decayed "
           "from distill_lr to 0 over distill_epochs epochs, a half cosine per step)", str, "loop",
           _check_choice(SCHEDULES)),
    Option("dense_targets", 0.0, "fit each pruned layer to the dense model's output on the dense model's inputs "
           "instead of its own output on the pruned inputs: 1 fully, 0 not at all (default), between: a blend of both "
           "(0.5 measured best; Linear and Conv1D layers; experts keep their own)", float, "loop", _check_fraction),
    Option("sequential", False, "prune a block's layers in the order its data flows through them (q/k/v, then o, "
           "then gate/up, then down: groups found by running the block), each group's statistics taken with the "
           "earlier groups already pruned (one more partial block forward per group)", None, "loop", _check_bool),
    Option("stream_memory", "device", "where the block loop keeps its streams of hidden states between blocks: device "
           "(the compute device: fastest) or host (host memory, each batch moved to the device as a block reads it: "
           "for a GPU smaller than the streams, e.g. a 7B model with reconstruction on 24 GB; README \"Memory\"); the "
           "same results either way", str, "loop", _check_choice(STREAM_MEMORIES)),
    Option("allocation", "uniform", "how sparse_ratio is spread over the layers: uniform (every layer the same), or "
           "error: each layer's error measured at ratios around it in a first pass, then the shares that minimise "
           "the summed error with exactly the same total (unstructured masks only; see allocation.py)", str, "loop",
           _check_choice(ALLOCATIONS)),
    Option("target_bits_per_weight", None, "a size budget in compressed bits per weight of the pruned layers (float16 "
           "as the Atlas export stores it, zstd blocks: admm_sparse.size): each layer's sparse_ratio and keep_bits "
           "(off, 3, 2 or 1) chosen from a probe pass by measured error per byte to meet it (sparse_ratio then unset; "
           "unstructured masks only; see budget.py); none: no budget", _optional_float, "loop", _check_bits_per_weight),
)
_PROCESSOR_KEYS = {"type"} | {o.name for o in OPTIONS}
PLACEMENT_OPTIONS = ("stream_memory",)

# Named bundles of options (`admm-sparse prune --preset NAME`, FloatSparseConfig.from_preset): applied over the
# config file, under the command line's own flags. "best": the most accurate combination measured at 0.7 on the
# BENCHMARKS.md protocol (benchmarks/RESULTS.md, "Accuracy levers": sequential groups, dense targets as a half
# blend, block reconstruction for 5 epochs; at 0.5 and 2:4 reconstruction alone is slightly better, README), with
# the fit and the calibration passes in bfloat16 autocast (at 0.7 55.55 in 410 s, against 55.37 in 458 s with
# float32 calibration passes: within 5x the seed mode's time; 3.9-4.3x on another CPU, 2026-12-07). Distillation
# on top (distill_epochs 2, distill_samples 64) is more accurate still but stays out of the preset: it needs the
# whole model and 16 bytes per pruned weight on the device and cannot resume, where the preset takes the model a
# block at a time (a 7B model through a 24 GB GPU with stream_memory host) and resumes (README "Presets"). "fast":
# fast mode.
PRESETS = {
    "best": dict(sequential=True, dense_targets=0.5, reconstruct_epochs=5, reconstruct_dtype="bfloat16",
                 calibration_dtype="bfloat16"),
    "fast": dict(mode="fast"),
}


def _check_pruner_options(options: dict, where: str) -> None:
    from .layer import check_options

    for key, value in options.items():
        try:
            check_options({key: value})
        except (TypeError, ValueError) as exc:
            message = str(exc).removeprefix(f"{key} ")  # check_options names the key; `where` already does
            raise ConfigError(f"{where}{key}: {message}") from None


@dataclass
class FloatSparseConfig:
    """One float_sparse processor: prune the selected nn.Linear layers to `sparse_ratio` zeros.

    sparse_ratio None means the seed's 0.3, or 1 - N/M for an "N:M" mask_structure (an explicit ratio must
    then agree); after construction it holds the resolved number, except under a size budget
    (target_bits_per_weight), which chooses every layer's ratio and leaves it None."""

    sparse_ratio: float | None = None
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    mask_structure: str = "unstructured"
    mode: str = "seed"
    round_in_admm: bool | None = None
    allow_tf32: bool = False
    calibration_dtype: str = "auto"
    keep_bits: int | None = 2
    keep_proportion: float = 0.02
    salience_bits: float | None = None
    reconstruct_epochs: int = 0
    reconstruct_lr: float = 3e-3
    reconstruct_dtype: str = "model"
    reconstruct_schedule: str = "constant"
    reconstruct_unit: str = "block"
    distill_epochs: int = 0
    distill_lr: float = 3e-4
    distill_samples: int = 0
    distill_schedule: str = "constant"
    dense_targets: float = 0.0
    sequential: bool = False
    stream_memory: str = "device"
    allocation: str = "uniform"
    target_bits_per_weight: float | None = None

    def __post_init__(self):
        from .layer import resolve_sparse_ratio

        if self.target_bits_per_weight is not None:
            self._check_budget()
        for option in OPTIONS:
            if option.check is not None:
                setattr(self, option.name, option.check(getattr(self, option.name), option.name))
        _check_pruner_options(self.pruner_options(), "")
        if self.target_bits_per_weight is None:  # a budget leaves sparse_ratio None: it chooses each layer's
            try:
                self.sparse_ratio = resolve_sparse_ratio(self.sparse_ratio, self.mask_structure)
            except ValueError as exc:
                raise ConfigError(f"sparse_ratio: {exc}") from None
        if self.distill_samples and not self.distill_epochs:
            raise ConfigError(f"distill_samples: {self.distill_samples} windows sampled for distillation, which is off "
                              "(distill_epochs 0): set distill_epochs, or distill_samples to 0")
        if self.allocation != "uniform" and self.mask_structure != "unstructured":
            raise ConfigError(f"allocation: {self.allocation!r} gives layers different ratios, which needs "
                              f"mask_structure unstructured ({self.mask_structure!r} fixes every row's count); "
                              "set allocation to uniform")

    def _check_budget(self) -> None:
        """A size budget chooses every layer's ratio and keep bits: the options that would fix them are refused."""
        if self.sparse_ratio is not None:
            raise ConfigError(f"target_bits_per_weight: it chooses each layer's sparse_ratio, so sparse_ratio must not "
                              f"be set (got {self.sparse_ratio!r}); remove one of the two")
        if self.mask_structure != "unstructured" or self.allocation != "uniform":
            raise ConfigError("target_bits_per_weight: it gives layers different ratios, which needs mask_structure "
                              f"unstructured (got {self.mask_structure!r}) and allocation uniform (got "
                              f"{self.allocation!r}: the budget allocates by error per byte itself)")
        if self.salience_bits is not None:
            raise ConfigError("target_bits_per_weight: it chooses each layer's keep-bit rounding from its own grid "
                              f"(keep_bits and keep_proportion), so salience_bits must not be set (got "
                              f"{self.salience_bits!r}); remove one of the two")

    @classmethod
    def from_preset(cls, name: str, **options) -> "FloatSparseConfig":
        """A config with the options of PRESETS[name], then `options` over them."""
        return cls(**{**preset_options(name), **options})

    def pruner_options(self) -> dict:
        """The options this config gives the ADMM pruner's fasterprune."""
        return {o.name: getattr(self, o.name) for o in OPTIONS if o.scope == "pruner"}

    def loop_options(self) -> dict:
        """The block loop's own options (admm_sparse.pipeline, admm_sparse.reconstruct)."""
        return {o.name: getattr(self, o.name) for o in OPTIONS if o.scope == "loop"}

    def to_dict(self) -> dict:
        return asdict(self)


assert [f.name for f in fields(FloatSparseConfig)] == [o.name for o in OPTIONS], "OPTIONS and the config differ"


def preset_options(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; the presets are: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def parse_config(data, source: str = "<config>") -> FloatSparseConfig:
    """Validate a loaded YAML document (dicts and lists); `source` names the file in messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'spec' key at the top, got {type(data).__name__}")
    unknown = set(data) - {"spec"} - _IGNORED_TOP_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}; expected 'spec'")
    spec = data.get("spec")
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: 'spec' must be a mapping with a 'process' list")
    unknown = set(spec) - {"process"}
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)} in 'spec'; only 'spec.process' is supported")
    process = spec.get("process")
    if not isinstance(process, list) or not process:
        raise ConfigError(f"{source}: 'spec.process' must be a non-empty list of processors")
    if len(process) > 1:
        raise ConfigError(f"{source}: 'spec.process' has {len(process)} entries; exactly one "
                          f"'{PROCESSOR_TYPE}' processor is supported")
    entry, where = process[0], f"{source}: spec.process[0]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with type: \"{PROCESSOR_TYPE}\", got {entry!r}")
    if entry.get("type") != PROCESSOR_TYPE:
        raise ConfigError(f"{where}.type: unknown processor type {entry.get('type')!r}; expected \"{PROCESSOR_TYPE}\"")
    unknown = set(entry) - _PROCESSOR_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_PROCESSOR_KEYS)}")
    try:
        return FloatSparseConfig(**{o.name: entry[o.name] for o in OPTIONS if o.name in entry})
    except ConfigError as exc:  # its message starts with the key
        raise ConfigError(f"{where}.{exc}") from None


def load_config(path: str | Path) -> FloatSparseConfig:
    """Read and validate a float_sparse YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, str(path))
