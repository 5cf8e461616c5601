"""Block-by-block float_sparse pruning of a whole model (SPEC §4).

Decoder models (anything with a stack of repeated blocks: LLaMA, Qwen2, Mistral, Gemma, OPT, ...):
1. capture block 0's inputs for every calibration batch, with the keyword arguments the model passes
   its blocks (attention mask, position ids / embeddings), by running the model up to block 0;
2. for each block: move it to the compute device, hook its selected nn.Linear layers, run the batches,
   prune those layers, run the block again with the pruned weights to make the next block's inputs,
   move it back. Only one block is on the compute device at a time.
Models without a block stack fall back to collecting every selected layer in one pass of the whole model.
"""
from __future__ import annotations

import inspect
import time
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import FloatSparseConfig
from .layer import AdmmPruner, parse_mask_structure
from .select import select_linears

# make_pruner(name, layer) -> object with add_batch(inp), fasterprune(sparse_ratio) -> report, free().
# The report needs at least sparsity, relative_error and seconds (a dataclass, an object or a dict).
PrunerFactory = Callable[[str, nn.Linear], Any]


def admm_pruner_factory(config: FloatSparseConfig) -> PrunerFactory:
    """The default pruner: the ADMM pruner of SPEC §1-3 with the config's mask structure and mode."""
    options = config.pruner_options()
    return lambda name, layer: AdmmPruner(layer, **options)


# ---------------------------------------------------------------- which layers

def find_block_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(full name, ModuleList) of the model's stack of repeated blocks, or None.

    The stack is the nn.ModuleList whose children all share one class and contain nn.Linear layers;
    if several qualify (an encoder and a decoder, experts inside blocks), the one with most parameters.
    """
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(b) for b in module}) != 1 or isinstance(module[0], nn.Linear):
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    return None if best is None else (best[1], best[2])


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that may be pruned: those inside the block stack; without one, all but the output embedding."""
    stack = find_block_stack(model)
    if stack is not None:
        prefix = stack[0] + "."
        return [(n, m) for n, m in model.named_modules() if n.startswith(prefix)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules() if m is not head]


def plan(model: nn.Module, config: FloatSparseConfig) -> dict[str, nn.Linear]:
    """The nn.Linear layers the config selects, by full name, in model order (warns about unused patterns).
    An "N:M" mask_structure leaves out, with a warning, layers whose in_features M does not divide."""
    selected = select_linears(candidate_modules(model), config.include, config.exclude)
    kind, _, m = parse_mask_structure(config.mask_structure)
    misfits = [name for name, layer in selected.items() if kind == "N:M" and layer.in_features % m]
    if misfits:
        warnings.warn(f"mask_structure {config.mask_structure!r} needs in_features divisible by {m}; left dense: "
                      f"{misfits}", stacklevel=2)
    return {name: layer for name, layer in selected.items() if name not in misfits}


# ---------------------------------------------------------------- calibration plumbing

class _StopForward(Exception):
    """Raised by the catcher once block 0's inputs are recorded: the rest of the model need not run."""


class _Catcher(nn.Module):
    """Stands in for block 0 and records what the model passes it."""

    def __init__(self, block: nn.Module, records: list):
        super().__init__()
        # Kept out of the module tree so that moving the model does not move the block.
        self.__dict__["_block"] = block
        self.__dict__["_records"] = records

    def forward(self, *args, **kwargs):
        self._records.append((args, kwargs))
        raise _StopForward

    def __getattr__(self, name):
        # Models read block attributes while looping (e.g. attention_type for sliding-window masks).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _share_equal(kwargs: dict, first: dict) -> dict:
    # Masks and position embeddings are usually the same for every batch; keep one copy of each.
    out = {}
    for key, value in kwargs.items():
        ref = first.get(key)
        same = (isinstance(value, torch.Tensor) and isinstance(ref, torch.Tensor) and value.shape == ref.shape
                and value.dtype == ref.dtype and torch.equal(value, ref))
        out[key] = ref if same else value
    return out


def _capture_block_inputs(model, stack_name, blocks, batches, device) -> tuple[list, list]:
    """Hidden states and (extra args, kwargs) that block 0 receives for each batch, on `device`."""
    records: list = []
    parent, attr = _parent(model, stack_name)
    home = next(model.parameters()).device
    setattr(parent, attr, nn.ModuleList([_Catcher(blocks[0], records)]))
    try:
        model.to(device)  # moves everything but the blocks
        for batch in batches:
            try:
                _call_model(model, batch.to(device))
            except _StopForward:
                pass
    finally:
        setattr(parent, attr, blocks)
        model.to(home)
    if len(records) != len(batches):
        raise RuntimeError(f"the model did not call its block stack '{stack_name}' for every batch; "
                           "this model is not supported by the block-by-block pipeline")
    hidden, extras = [], []
    for args, kwargs in records:
        if args:
            h, args = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            h = kwargs.pop("hidden_states")
        if "use_cache" in kwargs:
            kwargs = {**kwargs, "use_cache": False}
        hidden.append(h)
        extras.append((args, _share_equal(kwargs, extras[0][1]) if extras else kwargs))
    return hidden, extras


def _call_model(model, input_ids):
    # Hugging Face models take input_ids and must not build a KV cache; plain modules take the tensor.
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params:
        return model(input_ids)
    return model(input_ids=input_ids, **({"use_cache": False} if "use_cache" in params else {}))


def _run_block(block, hidden, extras) -> list[torch.Tensor]:
    outs = []
    for h, (args, kwargs) in zip(hidden, extras):
        out = block(h, *args, **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


def _hook(pruner, calls: dict, name: str):
    def collect(module, args, kwargs, output):
        pruner.add_batch((args[0] if args else kwargs["input"]).detach())
        calls[name] += 1
    return collect


def _report_dict(report) -> dict:
    if isinstance(report, dict):
        return dict(report)
    if hasattr(report, "to_dict"):
        return report.to_dict()
    return {k: v for k, v in vars(report).items() if not k.startswith("_")}


def _prune_layers(layers: dict[str, nn.Linear], run: Callable[[], Any], make_pruner: PrunerFactory,
                  sparse_ratio: float, progress: bool, desc: str) -> list[dict]:
    """Hook `layers`, call run() to feed them calibration data, then prune each one."""
    pruners = {name: make_pruner(name, layer) for name, layer in layers.items()}
    calls = dict.fromkeys(layers, 0)
    handles = [layer.register_forward_hook(_hook(pruners[name], calls, name), with_kwargs=True)
               for name, layer in layers.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    unused = [name for name, n in calls.items() if n == 0]
    if unused:
        warnings.warn(f"layer(s) {unused} received no calibration input (e.g. experts no token was routed to); "
                      "they are left dense", stacklevel=3)
    rows = []
    for name in tqdm(list(pruners), desc=desc, unit="layer", leave=False, disable=not progress):
        pruner = pruners.pop(name)
        if calls[name]:
            start = time.perf_counter()
            report = _report_dict(pruner.fasterprune(sparse_ratio))
            report.setdefault("seconds", time.perf_counter() - start)
            rows.append({"name": name, **report})
        pruner.free()
    return rows


def _batches(calib, batch_size: int) -> list[torch.Tensor]:
    if isinstance(calib, torch.Tensor):
        calib = calib if calib.dim() == 2 else calib.reshape(1, -1)
        return list(calib.split(batch_size))
    return [c if c.dim() == 2 else c.reshape(1, -1) for c in calib]


# ---------------------------------------------------------------- the whole model

def prune_model(model: nn.Module, calib: torch.Tensor | Iterable[torch.Tensor], config: FloatSparseConfig | None = None,
                *, device: str | torch.device | None = None, make_pruner: PrunerFactory | None = None,
                batch_size: int = 1, progress: bool = True) -> list[dict]:
    """Prune the model in place; returns one report dict per pruned layer (name first), in model order.

    calib: token windows [num_samples, seq_len] (or a list of [batch, seq_len] tensors), fed in batches of
    batch_size. device: where each block runs (default: where the model is); the model stays where it is.
    make_pruner: PrunerFactory, default the ADMM pruner with the config's options. A selected layer that
    no calibration token reaches (an MoE expert, an unused branch) is left dense, with a warning.
    """
    config = config or FloatSparseConfig()
    make_pruner = make_pruner or admm_pruner_factory(config)
    selected = plan(model, config)
    if not selected:
        return []
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    batches = _batches(calib, batch_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            stack = find_block_stack(model)
            if stack is None:
                return _prune_one_pass(model, selected, batches, device, home, make_pruner, config, progress)
            return _prune_blockwise(model, stack, selected, batches, device, home, make_pruner, config, progress)
    finally:
        model.train(was_training)


def _prune_blockwise(model, stack, selected, batches, device, home, make_pruner, config, progress) -> list[dict]:
    stack_name, blocks = stack
    per_block = [{n: m for n, m in selected.items() if n.startswith(f"{stack_name}.{i}.")} for i in range(len(blocks))]
    last = max(i for i, layers in enumerate(per_block) if layers)  # later blocks need no inputs
    hidden, extras = _capture_block_inputs(model, stack_name, blocks, batches, device)
    rows = []
    for i in tqdm(range(last + 1), desc="blocks", unit="block", disable=not progress):
        block = blocks[i].to(device)
        try:
            if per_block[i]:
                rows += _prune_layers(per_block[i], lambda: _run_block(block, hidden, extras), make_pruner,
                                      config.sparse_ratio, progress, f"block {i}")
            if i < last:
                hidden = _run_block(block, hidden, extras)  # with the pruned weights
        finally:
            block.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _prune_one_pass(model, selected, batches, device, home, make_pruner, config, progress) -> list[dict]:
    def run():
        for batch in batches:
            _call_model(model, batch.to(device))

    model.to(device)
    try:
        return _prune_layers(selected, run, make_pruner, config.sparse_ratio, progress, "layers")
    finally:
        model.to(home)


# ---------------------------------------------------------------- the report

def summarize(rows: list[dict]) -> dict:
    """Totals over the per-layer reports: layer count, overall zero fraction, mean relative error, seconds."""
    if not rows:
        return {"layers": 0, "sparsity": 0.0, "mean_relative_error": 0.0, "seconds": 0.0}
    sizes = [int(torch.Size(r["shape"]).numel()) if "shape" in r else 1 for r in rows]
    return {
        "layers": len(rows),
        "sparsity": sum(r["sparsity"] * s for r, s in zip(rows, sizes)) / sum(sizes),
        "mean_relative_error": sum(r["relative_error"] for r in rows) / len(rows),
        "seconds": sum(r["seconds"] for r in rows),
    }


def format_table(rows: list[dict]) -> str:
    """The per-layer report as a fixed-width text table, with a totals line."""
    width = max([len("layer")] + [len(r["name"]) for r in rows])
    header = f"{'layer':<{width}} {'shape':>11} {'sparsity':>8} {'rel.err':>8} {'seconds':>8} {'damping':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = "x".join(str(s) for s in r.get("shape", ()))
        damping = r.get("damping")
        damping = f"{damping:9.3g}" if isinstance(damping, (int, float)) else f"{'-':>9}"
        lines.append(f"{r['name']:<{width}} {shape:>11} {r['sparsity']:8.4f} {r['relative_error']:8.4f} "
                     f"{r['seconds']:8.2f} {damping}")
    s = summarize(rows)
    lines.append("-" * len(header))
    lines.append(f"{s['layers']} layers, sparsity {s['sparsity']:.4f}, mean relative error "
                 f"{s['mean_relative_error']:.4f}, {s['seconds']:.1f} s pruning")
    return "\n".join(lines)
