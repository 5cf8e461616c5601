"""Block-by-block float_sparse pruning of a whole model (SPEC §4).

Decoder models (anything with a stack of decoder blocks: LLaMA, Qwen, Mistral, Gemma, Phi-3, OPT, GPT-2,
Mixtral, Qwen3-MoE, DeepSeek-V3, ...):
1. capture block 0's inputs for every calibration batch, and the keyword arguments the model passes each
   block (attention masks, position ids / embeddings: they differ between sliding-window and global
   blocks), by running the model with recorders in place of the blocks;
2. for each block: move it to the compute device, hook its selected layers (admm_sparse.targets: Linears,
   Conv1Ds, experts of fused MoE parameters), run the batches, prune those layers, (optionally) fit their
   kept weights to the dense block's outputs (admm_sparse.reconstruct), run the block again with the pruned
   weights to make the next block's inputs, move it back. Only one block is on the compute device at a time.
Models without a block stack fall back to collecting every selected layer in one pass of the whole model.
"""
from __future__ import annotations

import ctypes
import dataclasses
import inspect
import math
import resource
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import allocation, budget
from . import device as devices
from .config import FloatSparseConfig
from .distributed import Group, layer_cost, split_layers, sum_statistics
from .evaluate import nll_sum
from .layer import AdmmPruner, all_finite, parse_mask_structure
from .reconstruct import block_output, holdout_split, reconstruct_block
from .select import select_targets
from .targets import Target, feeding, find_targets, is_conv1d, is_fused_experts, routers

# make_pruner(name, target) -> object with add_batch(inp), fasterprune(sparse_ratio) -> report, free(); the
# target's .weight is the layer's [out, in] weight (a view into the model: write the result into .data).
# The report needs at least sparsity, relative_error and seconds (a dataclass, an object or a dict).
PrunerFactory = Callable[[str, Target], Any]


def admm_pruner_factory(config: FloatSparseConfig, layer_options: dict[str, dict] | None = None) -> PrunerFactory:
    """The default pruner: the ADMM pruner of SPEC §1-3 with the config's options; layer_options: options of
    single layers over them, by name (a size budget's keep_bits and keep_proportion)."""
    options = config.pruner_options()
    layer_options = layer_options or {}
    return lambda name, layer: AdmmPruner(layer, **{**options, **layer_options.get(name, {})})


def keep_rounding(config: FloatSparseConfig, names, layer_options: dict[str, dict]) -> dict:
    """Each layer's keep-bit rounding, (keep_bits, keep_proportion, salience_bits) or None for none: the config's, or
    the layer's own options (for the rounding block reconstruction applies again)."""
    rounding, config_options = {}, config.pruner_options()
    for name in names:
        options = {**config_options, **layer_options.get(name, {})}
        rounding[name] = None if options["keep_bits"] is None else (options["keep_bits"], options["keep_proportion"],
                                                                    options["salience_bits"])
    return rounding


# ---------------------------------------------------------------- which layers

def _has_targets(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) or is_conv1d(m) or is_fused_experts(m) for m in module.modules())


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Candidate block stacks: every nn.ModuleList of modules holding prunable layers that is not inside
    another such list (so an MoE block's list of experts is not a stack), in model order."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(isinstance(b, nn.Linear) or is_conv1d(b) for b in module) or not all(_has_targets(b) for b in module):
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        found.append((name, module))
    return found


def _decoder_prefix(model: nn.Module) -> str | None:
    """Full name of the module that model.get_decoder() returns (the language model's decoder in multimodal
    wrappers), or None when the model has no such method or it returns the model itself."""
    get = getattr(model, "get_decoder", None)
    try:
        decoder = get() if callable(get) else None
    except Exception:  # noqa: BLE001 - models implement it loosely; without it we fall back to size
        return None
    if decoder is None or decoder is model:
        return None
    return next((name for name, m in model.named_modules() if m is decoder), None)


def find_block_stack(model: nn.Module, name: str | None = None) -> tuple[str, nn.ModuleList] | None:
    """(full name, ModuleList) of the model's stack of decoder blocks, or None.

    name: the stack's full name, given by the user (--blocks). Otherwise the candidate inside the language
    model's decoder (get_decoder()) when there is one, else the largest candidate by parameters: a vision
    tower beside the language model is never picked over it. Blocks may be of several kinds (dense and MoE,
    sliding-window and global attention).
    """
    stacks = block_stacks(model)
    if name is not None:
        match = [s for s in stacks if s[0] == name]
        if not match:
            listed = ", ".join(repr(n) for n, _ in stacks) or "none"
            raise ValueError(f"--blocks {name!r} is not a stack of blocks with prunable layers in this model; "
                             f"the candidates are: {listed}")
        return match[0]
    decoder = _decoder_prefix(model)
    if decoder is not None:
        inside = [s for s in stacks if decoder == "" or s[0].startswith(f"{decoder}.")]
        stacks = inside or stacks
    if not stacks:
        return None
    return max(stacks, key=lambda s: sum(p.numel() for p in s[1].parameters()))


def candidate_modules(model: nn.Module, stack: tuple[str, nn.ModuleList] | None = None) -> list[tuple[str, nn.Module]]:
    """Modules that may be pruned: those inside the block stack; without one, all but the output embedding."""
    # Every name of a module used in several places (so that a weight shared by two blocks is seen as tied).
    modules = list(model.named_modules(remove_duplicate=False))
    if stack is not None:
        prefix = stack[0] + "."
        return [(n, m) for n, m in modules if n.startswith(prefix)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in modules if m is not head]


@dataclass
class Plan:
    """What a config prunes in a model, and what it leaves alone on purpose."""

    stack: tuple[str, nn.ModuleList] | None
    targets: dict[str, Target]  # selected, by name, in model order
    routers: list[str]  # MoE routers: never pruned
    tied: dict[str, str]  # layer -> why it is left as it is (its weight is shared)
    unknown: list[str]  # parameters of 3 or more dimensions in a layout no Target kind reads: left dense


def make_plan(model: nn.Module, config: FloatSparseConfig, blocks: str | None = None) -> Plan:
    """Select the prunable layers (admm_sparse.targets) the config names, inside the block stack.

    Left out: MoE routers (a pruned router changes which experts run; they are not nn.Linear in most
    transformers 5 models anyway, and are excluded where they are); a layer whose weight is shared with a
    module that is not selected (pruning it would change that module too); a weight shared by several
    selected layers is pruned once, at its first use. An "N:M" mask_structure leaves out, with a warning,
    layers whose in_features M does not divide."""
    stack = find_block_stack(model, blocks)
    modules = candidate_modules(model, stack)
    router_names = routers(modules)
    targets = [t for t in find_targets(modules) if not any(t.name == r or t.name.startswith(f"{r}.")
                                                          for r in router_names)]
    selected = select_targets(targets, config.include, config.exclude)
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    selected_params = {t.param_name for t in selected.values()}
    tied, claimed = {}, {}
    for name, target in list(selected.items()):
        names = owners.get(id(target.parameter), [target.param_name])
        if len(names) == 1:
            continue
        outside = [n for n in names if n not in selected_params]
        first = claimed.setdefault(id(target.parameter), name)
        if outside:
            tied[name] = f"its weight is shared with {outside[0]}, which is not pruned"
        elif first != name:
            tied[name] = f"its weight is {first}'s (tied), pruned there once"
        if name in tied:
            del selected[name]
    if tied:
        warnings.warn("left as they are, their weights being shared: "
                      + "; ".join(f"{n}: {why}" for n, why in tied.items()), stacklevel=2)
    kind, _, m = parse_mask_structure(config.mask_structure)
    misfits = [name for name, t in selected.items() if kind == "N:M" and t.shape[1] % m]
    if misfits:
        warnings.warn(f"mask_structure {config.mask_structure!r} needs in_features divisible by {m}; left dense: "
                      f"{misfits}", stacklevel=2)
    selected = {name: t for name, t in selected.items() if name not in misfits}
    known = {t.param_name for t in targets}
    unknown = [f"{name}.{p}" if name else p for name, m in modules for p, param in m.named_parameters(recurse=False)
               if param.dim() >= 3 and f"{name}.{p}" not in known]
    if unknown:
        warnings.warn(f"parameters in a layout admm_sparse does not know are left dense: {unknown}", stacklevel=2)
    return Plan(stack, selected, router_names, tied, unknown)


# ---------------------------------------------------------------- calibration plumbing

def calibration_autocast(config: FloatSparseConfig, device: torch.device):
    """The context the calibration forwards run in (config.calibration_dtype): bfloat16 or float16 autocast, or
    nothing. The evaluation windows and the float16 check always run in the model's own dtype. The statistics
    are float32 products of each layer's input whatever the forwards' dtype (AdmmPruner.add_batch)."""
    dtype = config.calibration_dtype
    if dtype == "auto":
        dtype = "bfloat16" if config.mode == "fast" and devices.gemm_dtype(device) == torch.bfloat16 else "model"
    return nullcontext() if dtype == "model" else torch.autocast(device.type, dtype=getattr(torch, dtype))


def _check_finite_stream(hidden: list[torch.Tensor], where: str) -> None:
    """The calibration stream leaving a block must be finite: float16 forwards (the model's dtype, or
    calibration_dtype float16) overflow beyond 65504, and every later statistic would be garbage."""
    if not all(all_finite(h) for h in hidden):
        raise ValueError(f"the calibration forwards overflowed in {where} (its outputs hold inf or NaN): in float16 "
                         "activations beyond 65504 are lost; use calibration_dtype bfloat16 (where the device has it) "
                         "or model, or a float32 model")


class _StopForward(Exception):
    """Raised by the last recorder: the rest of the model need not run."""


class _Recorder(nn.Module):
    """Stands in for block i while the model runs: records what the model passes it and returns the hidden
    states unchanged, so that the model goes on to call the next block with that block's own arguments
    (masks and position embeddings differ between sliding-window and global blocks)."""

    def __init__(self, block: nn.Module, records: list, last: bool):
        super().__init__()
        # Kept out of the module tree so that moving the model does not move the block.
        self.__dict__["_block"] = block
        self.__dict__["_records"] = records
        self.__dict__["_last"] = last

    def forward(self, *args, **kwargs):
        self._records.append((args, kwargs))
        if self._last:
            raise _StopForward
        return args[0] if args else kwargs["hidden_states"]

    def __getattr__(self, name):
        # Models read block attributes while looping (e.g. attention_type for sliding-window masks).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


class _Interner:
    """Keeps one copy of equal values: masks and position embeddings repeat across batches and blocks."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def __call__(self, value):
        if isinstance(value, (tuple, list)):
            return type(value)(self(v) for v in value)
        if not isinstance(value, torch.Tensor):
            return value
        for ref in self.seen:
            if ref.shape == value.shape and ref.dtype == value.dtype and ref.device == value.device \
                    and torch.equal(ref, value):
                return ref
        self.seen.append(value)
        return value


def _capture_block_inputs(model, stack_name, blocks, batches, device, count) -> tuple[list, list]:
    """Block 0's hidden states for each batch, and for each of the first `count` blocks the (extra args,
    kwargs) the model passes it for each batch, on `device` (where the caller put what precedes the stack).
    The model runs with recorders in place of the blocks: the embeddings and whatever else precedes the
    stack run, the blocks do not."""
    records: list[list] = [[] for _ in range(count)]
    parent, attr = _parent(model, stack_name)
    setattr(parent, attr, nn.ModuleList([_Recorder(blocks[i], records[i], i == count - 1) if i < count
                                         else blocks[i] for i in range(len(blocks))]))
    try:
        for batch in batches:
            try:
                _call_model(model, batch.to(device))
            except _StopForward:
                pass
    finally:
        setattr(parent, attr, blocks)
    if any(len(r) != len(batches) for r in records):
        raise RuntimeError(f"the model did not call each block of its stack '{stack_name}' once per batch; "
                           "this model is not supported by the block-by-block pipeline")
    intern = _Interner()
    hidden, extras = [], []
    for i, block_records in enumerate(records):
        extras.append([])
        for args, kwargs in block_records:
            if args:
                h, args = args[0], args[1:]
            else:
                kwargs = dict(kwargs)
                h = kwargs.pop("hidden_states")
            if "use_cache" in kwargs:
                kwargs = {**kwargs, "use_cache": False}
            if i == 0:
                hidden.append(h)
            extras[i].append((intern(args), {k: intern(v) for k, v in kwargs.items()}))
    return hidden, extras


def _call_model(model, input_ids):
    # Hugging Face models take input_ids and must not build a KV cache; plain modules take the tensor.
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params:
        return model(input_ids)
    return model(input_ids=input_ids, **({"use_cache": False} if "use_cache" in params else {}))


def _run_block(block, hidden, extras) -> list[torch.Tensor]:
    return [block_output(block, h, args, kwargs) for h, (args, kwargs) in zip(hidden, extras)]


def _report_dict(report) -> dict:
    if isinstance(report, dict):
        return dict(report)
    if hasattr(report, "to_dict"):
        return report.to_dict()
    return {k: v for k, v in vars(report).items() if not k.startswith("_")}


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are the same values in memory: the hooks pass each input .detach()ed, a new tensor
    object over the same storage. (The batch list keeps `a` alive, so its memory cannot be reused by `b`.)"""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype and a.device == b.device)


class _Feed:
    """Routes each captured input to its layer's pruner. Layers that read the very same tensor in a batch
    (q/k/v, gate/up, an expert's gate and up) form a group: only the first one's pruner accumulates
    statistics, and the others share them (AdmmPruner.share_statistics); pruners without that method get
    every input. The grouping must be the same in every batch.

    dense_inputs: for dense targets, {id(module): the dense model's input to that layer} of the batch being fed
    (kept up to date by the caller); each leader's pruner also gets add_cross(input, dense input), and
    dense_blend = blend."""

    def __init__(self, pruners: dict[str, Any], dense_inputs: dict | None = None, blend: float = 0.0):
        self.pruners = pruners
        self.dense_inputs = dense_inputs
        if dense_inputs is not None:
            if not all(hasattr(p, "add_cross") for p in pruners.values()):
                raise ValueError("dense targets need a pruner with add_cross (the ADMM pruner); set dense_targets to 0")
            for pruner in pruners.values():
                pruner.dense_blend = blend
        self.sharing = all(hasattr(p, "share_statistics") for p in pruners.values())
        self.calls = dict.fromkeys(pruners, 0)
        self.tokens = dict.fromkeys(pruners, 0)
        self.leader: dict[str, str] = {}  # follower -> leader
        self.batch: list[tuple[torch.Tensor, str]] = []  # (input, first layer that read it) this batch

    def new_batch(self, *_):
        self.batch = []

    def __call__(self, target: Target, inp: torch.Tensor) -> None:
        name = target.name
        first = self.calls[name] == 0
        self.calls[name] += 1
        self.tokens[name] += inp.numel() // max(inp.shape[-1], 1)
        leader = next((owner for seen, owner in self.batch if _same_tensor(seen, inp)), None) if self.sharing else None
        if first:
            if leader is not None:
                self.leader[name] = leader
        elif self.leader.get(name) != leader:
            raise RuntimeError(f"layer {name} shared its input with {self.leader.get(name)} in an earlier "
                               f"calibration batch but not in this one; pass a make_pruner without "
                               "share_statistics to collect its statistics on its own")
        if leader is None:
            if inp.dtype == torch.float16 and not all_finite(inp):
                raise ValueError(f"the calibration input of {name} overflowed float16 (it holds inf or NaN): use "
                                 "calibration_dtype bfloat16 (where the device has it) or model, or a float32 model")
            self.pruners[name].add_batch(inp)
            self.batch.append((inp, name))
            dense = self.dense_inputs.get(id(target.module)) if self.dense_inputs is not None else None
            if dense is not None:  # experts have none: their routed tokens differ between the streams
                self.pruners[name].add_cross(inp, dense)

    def share(self) -> None:
        for follower, leader in self.leader.items():
            self.pruners[follower].share_statistics(self.pruners[leader])

    def gather(self, group: Group) -> None:
        """Every rank's calls, tokens and groupings combined (a rank may not see an expert that others do)."""
        if not self.sharing or not all(hasattr(p, "hessian_sum") for p in self.pruners.values()):
            raise ValueError("pruning on several processes sums per-layer statistics: it needs the ADMM pruner "
                             "(or one with the same hessian_sum / square_sum / nsamples / tokens statistics)")
        names = list(self.pruners)
        counts = group.sum(torch.tensor([[self.calls[n], self.tokens[n]] for n in names], dtype=torch.float64))
        for name, (calls, tokens) in zip(names, counts.tolist()):
            self.calls[name], self.tokens[name] = int(calls), int(tokens)
        for leaders in group.gather_objects(self.leader):
            self.leader.update(leaders)


def _prune_targets(targets: list[Target], run: Callable[[], Any], batch_start: nn.Module, make_pruner: PrunerFactory,
                   ratios: dict[str, float], progress: bool, desc: str, group: Group, scalers: dict | None = None,
                   dense_inputs: dict | None = None, blend: float = 0.0) -> list[dict]:
    """Hook `targets`, call run() to feed them this rank's calibration data (batch_start's forward begins each
    batch), sum the statistics onto each layer's owner rank, prune each to its ratio (ratios, by name) there,
    and share the pruned weights.
    scalers: a dict that receives each layer this rank pruned's channel scaler (its pruner's `scaler`, or None).
    dense_inputs, blend: dense targets (see _Feed); run() keeps dense_inputs up to date batch by batch."""
    pruners = {t.name: make_pruner(t.name, t) for t in targets}
    feed = _Feed(pruners, dense_inputs, blend)
    handle = batch_start.register_forward_pre_hook(feed.new_batch)
    try:
        with feeding(targets, feed):
            run()
    finally:
        handle.remove()
    if group.size > 1:
        feed.gather(group)
    # Each rank prunes its share, balanced by cost; with the statistics summed on every rank (below), layers
    # that share one Hessian (q/k/v) can go to different ranks. A layer no whole-layer assignment can balance is
    # split over all ranks by its output rows (admm_sparse.split).
    costs = [layer_cost(t.shape) for t in targets]
    split = {targets[i].name for i in split_layers(costs, group.size)
             if getattr(pruners[targets[i].name], "can_split", lambda: False)()}
    owners = dict(zip(pruners, group.assign([0.0 if t.name in split else c for t, c in zip(targets, costs)])))
    if group.size > 1:
        for name, pruner in pruners.items():  # leaders only: followers share their leader's statistics
            if name not in feed.leader:
                sum_statistics(group, pruner)
    priors = _expert_priors(targets, feed, run, batch_start, make_pruner, group)  # onto the summed statistics
    feed.share()
    unused = [name for name, n in feed.calls.items() if n == 0 and name not in priors]
    if unused:
        warnings.warn(f"layer(s) {unused} received no calibration input (e.g. experts no token was routed to); "
                      "they are left dense", stacklevel=3)
    rows = []
    for name in tqdm(list(pruners), desc=desc, unit="layer", leave=False, disable=not progress):
        pruner = pruners.pop(name)
        if (feed.calls[name] or name in priors) and (name in split or owners[name] == group.rank):
            start = time.perf_counter()
            if name in split:
                pruner.split_group = group
            report = _report_dict(pruner.fasterprune(ratios[name]))
            report.setdefault("seconds", time.perf_counter() - start)
            report["tokens"] = feed.tokens[name]  # routed to it (a prior's tokens are counted apart)
            if name in priors:
                report["prior_tokens"] = priors[name]
            if name in split:
                report["split_over"] = group.size
            if name not in split or group.rank == 0:  # a split layer's report is the same on every rank
                rows.append({"name": name, **report})
            if scalers is not None:  # for the keep-bit rounding after block reconstruction
                scaler = getattr(pruner, "scaler", None)
                scalers[name] = scaler.clone() if isinstance(scaler, torch.Tensor) else None
        pruner.free()
    if group.size == 1:
        return rows
    for t in targets:  # every rank runs the pruned block next (a split layer's rows are on every rank already)
        if (feed.calls[t.name] or t.name in priors) and t.name not in split:
            weight = t.weight.clone()
            group.broadcast(weight, owners[t.name])
            t.weight.copy_(weight)
    order = {t.name: i for i, t in enumerate(targets)}
    return sorted((row for part in group.gather_objects(rows) for row in part), key=lambda row: order[row["name"]])


def _prune_block(block: nn.Module, targets: list[Target], hidden, extras, config: FloatSparseConfig, device,
                 make_pruner: PrunerFactory, ratios: dict[str, float], progress: bool, desc: str, group: Group,
                 scalers: dict | None, dense_layer_inputs: dict | None = None) -> list[dict]:
    """Prune a block's selected layers on its calibration inputs: all from one pass, or with config.sequential
    group by group in data-flow order (data_flow_groups), each group's statistics from a pass with the groups
    before it already pruned, the pass stopped once the group's layers have run. dense_layer_inputs: for dense
    targets (config.dense_targets), {id(layer module): the dense model's input to it, per batch} (from
    _run_dense_block); each group's entries are dropped once the group is pruned."""
    parts = data_flow_groups(block, targets, hidden[0], extras[0]) if config.sequential else [targets]
    dense_inputs = {} if dense_layer_inputs is not None else None  # this batch's, for _Feed
    rows = []
    for part in parts:
        # Experts keep their own targets: the tokens routed to them differ between the two streams.
        fitted = list({id(t.module) for t in part if t.kind != "expert"})

        def feed(part=part, fitted=fitted):
            modules = list({id(t.module): t.module for t in part}.values())
            last = part is parts[-1]  # nothing after the last group's layers is needed either, but little is left
            with calibration_autocast(config, device), _stop_after(modules, enabled=not last) as stop:
                for b, (h, (args, kwargs)) in enumerate(zip(hidden, extras)):
                    if dense_inputs is not None:
                        dense_inputs.clear()
                        dense_inputs.update({key: dense_layer_inputs[key][b] for key in fitted})
                    stop.reset()
                    try:
                        block(h, *args, **kwargs)
                    except _GroupFed:
                        pass
        rows += _prune_targets(part, feed, block, make_pruner, ratios, progress, desc, group, scalers,
                               dense_inputs, config.dense_targets)
        if dense_layer_inputs is not None:
            for key in fitted:
                dense_layer_inputs.pop(key)
    order = {t.name: i for i, t in enumerate(targets)}
    return sorted(rows, key=lambda row: order[row["name"]])


def _run_dense_block(block: nn.Module, hidden, extras, modules: list[nn.Module]) -> tuple[list, dict]:
    """The block's outputs on `hidden` (run before any of its layers is pruned), and {id(module): its input, per
    batch (None where it did not run)} for each of `modules`: the dense inputs dense targets fit, recorded in the
    same pass, in the model's dtype (also where the calibration passes run in bfloat16 autocast). Held until their
    layers are pruned: about one hidden-state stream per distinct input (q/k/v share one, as do gate/up)."""
    recorded: dict[int, list] = {id(m): [] for m in modules}

    def record(module, inputs, kwargs):
        batch = recorded[id(module)]
        if len(batch) == len(outputs):  # its first call in this batch
            batch.append((inputs[0] if inputs else next(iter(kwargs.values()))).detach())

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules]
    outputs: list[torch.Tensor] = []
    try:
        for h, (args, kwargs) in zip(hidden, extras):
            outputs.append(block_output(block, h, args, kwargs))
            for batch in recorded.values():
                batch.extend([None] * (len(outputs) - len(batch)))
    finally:
        for handle in handles:
            handle.remove()
    return outputs, recorded


class _GroupFed(Exception):
    """Raised once every layer of the group being calibrated has run in this batch."""


class _stop_after:
    """Context manager: while active, raises _GroupFed once each of `modules` has run in a batch; reset() starts
    a batch. Its hooks come after feeding()'s, so the layers' inputs are recorded first."""

    def __init__(self, modules: list[nn.Module], enabled: bool = True):
        self.modules, self.enabled, self.seen, self.handles = modules, enabled, set(), []

    def reset(self):
        self.seen = set()

    def __enter__(self):
        if self.enabled:
            for module in self.modules:
                self.handles.append(module.register_forward_hook(self._hook))
        return self

    def _hook(self, module, args, output):
        self.seen.add(id(module))
        if len(self.seen) == len(self.modules):
            raise _GroupFed

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False


def data_flow_groups(block: nn.Module, targets: list[Target], hidden: torch.Tensor, extras) -> list[list[Target]]:
    """The block's targets in groups, in the order the block runs them: layers that read the same input tensor
    are one group (q/k/v; gate/up; a fused experts module's layers, which run inside one module). Found by
    running the block once on one calibration batch with hooks on the layers' modules."""
    by_module: dict[int, list[Target]] = {}
    for t in targets:
        by_module.setdefault(id(t.module), []).append(t)
    groups: list[tuple[torch.Tensor, list[Target]]] = []
    called: set[int] = set()

    def hook(module, args, kwargs):
        if id(module) in called:
            return
        called.add(id(module))
        x = args[0] if args else next(iter(kwargs.values()))
        same = next((g for seen, g in groups if _same_tensor(seen, x)), None)
        if same is None:
            groups.append((x, list(by_module[id(module)])))
        else:
            same.extend(by_module[id(module)])

    handles = [by_module[m][0].module.register_forward_pre_hook(hook, with_kwargs=True) for m in by_module]
    try:
        args, kwargs = extras
        block(hidden, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    found = [g for _, g in groups]
    missed = [t for t in targets if id(t.module) not in called]  # not reached by this batch (an unused branch)
    return found + ([missed] if missed else [])


def _expert_priors(targets: list[Target], feed: _Feed, run: Callable[[], Any], batch_start: nn.Module,
                   make_pruner: PrunerFactory, group: Group) -> dict[str, int]:
    """Give every expert that saw fewer routed tokens than it has inputs a prior; returns {name: prior tokens}.

    Below d_in tokens an expert's Hessian is singular and the damping alone would decide its solve (with no
    token at all it could not be pruned). Such an expert gets, on top of its routed tokens, the statistics
    of ALL the block's calibration tokens passed through it, weighted to make up the missing tokens:
    H = H_routed + (d_in - n) / N_all * H_all (one more pass over the batches, for the rare experts only).
    Needs pruners with add_statistics (AdmmPruner); others keep their routed tokens only."""
    rare = [t for t in targets if t.kind == "expert" and feed.tokens[t.name] < t.shape[1]
            and t.name not in feed.leader and hasattr(feed.pruners[t.name], "add_statistics")]
    if not rare:
        return {}
    prior_feed = _Feed({t.name: make_pruner(t.name, t) for t in rare})
    handle = batch_start.register_forward_pre_hook(prior_feed.new_batch)
    try:
        with feeding(rare, prior_feed, all_tokens=True):
            run()
    finally:
        handle.remove()
    if group.size > 1:
        prior_feed.gather(group)
        for t in rare:
            if t.name not in prior_feed.leader:
                sum_statistics(group, prior_feed.pruners[t.name])
    prior_feed.share()
    added = {}
    for t in rare:
        missing = t.shape[1] - feed.tokens[t.name]
        feed.pruners[t.name].add_statistics(prior_feed.pruners[t.name], missing / prior_feed.tokens[t.name])
        added[t.name] = missing
    for t in rare:
        prior_feed.pruners[t.name].free()
    return added


def _batches(calib, batch_size: int) -> list[torch.Tensor]:
    if isinstance(calib, torch.Tensor):
        calib = calib if calib.dim() == 2 else calib.reshape(1, -1)
        return list(calib.split(batch_size))
    return [c if c.dim() == 2 else c.reshape(1, -1) for c in calib]


# ---------------------------------------------------------------- where weights come from

class InMemorySource:
    """The whole model is in memory: a block moves to the compute device for its turn and back after it;
    what runs before and after the stack (embeddings, final norm, head) likewise while it is needed."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.home = next(model.parameters()).device

    @contextmanager
    def outside(self, stack_name: str, device: torch.device):
        self._move_all_but(stack_name, device)
        try:
            yield
        finally:
            self._move_all_but(stack_name, self.home)

    def _move_all_but(self, stack_name: str, device: torch.device) -> None:
        parent, attr = _parent(self.model, stack_name)
        blocks = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleList())
        try:
            self.model.to(device)
        finally:
            setattr(parent, attr, blocks)

    @contextmanager
    def block(self, stack_name: str, i: int, device: torch.device):
        block = self.model.get_submodule(stack_name)[i].to(device)
        try:
            yield block
        finally:
            block.to(self.home)


# ---------------------------------------------------------------- the whole model

@dataclass
class PruneResult:
    """What prune_blocks did: the per-layer reports, and, when evaluation windows were given, the perplexity
    of the dense and the pruned model on them (each computed block by block as the blocks pass).
    reconstruction: with config.reconstruct_epochs > 0, one report per pruned block (reconstruct_block's)."""

    rows: list[dict]
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    block_seconds: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0
    reconstruction: list[dict] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)  # each selected layer's sparse_ratio (config.allocation)
    layer_options: dict[str, dict] = field(default_factory=dict)  # each layer's rounding, under a size budget
    budget: dict = field(default_factory=dict)  # a size budget's target and predicted bits per weight


def prune_model(model: nn.Module, calib: torch.Tensor | Iterable[torch.Tensor], config: FloatSparseConfig | None = None,
                *, device: str | torch.device | None = None, make_pruner: PrunerFactory | None = None,
                batch_size: int = 1, progress: bool = True, blocks: str | None = None) -> list[dict]:
    """Prune the model in place; returns one report dict per pruned layer (name first), in model order.

    calib: token windows [num_samples, seq_len] (or a list of [batch, seq_len] tensors), fed in batches of
    batch_size. device: where each block runs (default: where the model is); the model stays where it is.
    make_pruner: PrunerFactory, default the ADMM pruner with the config's options; it is given each layer's
    name and its admm_sparse.targets.Target (whose .weight is the [out, in] weight). blocks: the full name
    of the decoder stack, when find_block_stack's choice is not the right one. A selected layer that no
    calibration token reaches (an unused branch) is left dense, with a warning.
    """
    return prune_blocks(model, calib, config, device=device, make_pruner=make_pruner, batch_size=batch_size,
                        progress=progress, blocks=blocks).rows


def prune_blocks(model: nn.Module, calib, config: FloatSparseConfig | None = None, *,
                 device: str | torch.device | None = None, make_pruner: PrunerFactory | None = None,
                 batch_size: int = 1, progress: bool = True, blocks: str | None = None, source=None, writer=None,
                 state=None, eval_windows: torch.Tensor | None = None, dtype_check=None,
                 group: Group | None = None) -> PruneResult:
    """prune_model with the loop's seams open (see ARCHITECTURE.md): the block loop reads
    materialise block -> capture its layers' inputs -> prune them -> (reconstruct the block) -> run the block
    for the next inputs -> write -> release.

    source: where weights come from (default InMemorySource(model); source.StreamingSource materialises one
    block at a time from safetensors files). writer: an object whose add(tensors) receives every tensor of the
    model under its state_dict name as soon as it is final (a finished block's, then those outside the
    stack), e.g. job.ModelWriter; without one the model is pruned in place only. state: a
    resume.ResumeState, saved after every block, from which an interrupted run continues. eval_windows:
    [n, seq_len] token windows on which the dense and the pruned model's perplexities are measured as the
    blocks pass (no extra pass over the weights). dtype_check: a deploy.DtypeCheck stepped with every pruned
    block (does the pruned model stay finite in float16, as the Atlas card computes?). group: the processes
    sharing the work (distributed.Group; default this process alone): each runs its share of the windows,
    the statistics are summed onto each layer's owner, and every rank ends with the same pruned model and
    report; pass writer and state on rank 0 only (dtype_check on every rank: each checks its share).
    config.reconstruct_epochs > 0: block reconstruction (admm_sparse.reconstruct), one process only; the loop
    then also carries the dense model's hidden states, whose block outputs each pruned block is fitted to.
    """
    config = config or FloatSparseConfig()
    if config.target_bits_per_weight is not None and make_pruner is not None:
        raise ValueError("a size budget (target_bits_per_weight) chooses each layer's rounding for the ADMM pruner; "
                         "it cannot drive another pruner (make_pruner): drop one of the two")
    make_pruner = make_pruner or admm_pruner_factory(config)
    the_plan = make_plan(model, config, blocks)
    if not the_plan.targets and writer is None:
        return PruneResult([])
    source = source or InMemorySource(model)
    group = group or Group()
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else (home if home.type != "meta" else torch.device("cpu"))
    batches = _batches(calib, batch_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if the_plan.stack is None:
                if writer is not None or eval_windows is not None or dtype_check is not None or group.size > 1:
                    raise ValueError("this model has no stack of blocks: it can only be pruned in memory, as a whole")
                if config.reconstruct_epochs:
                    raise ValueError("block reconstruction (reconstruct_epochs) needs a stack of blocks; this model "
                                     "has none: set reconstruct_epochs to 0")
            else:
                _check_blockwise(config, batches, group)  # before any work, the probe passes included
            settings = (model, the_plan, batches, device, home, config, progress, source, batch_size, group)
            layer_options, budget_report = {}, {}
            if config.target_bits_per_weight is not None:
                ratios, layer_options, budget_report = _budget_settings(*settings)
                make_pruner = admm_pruner_factory(config, layer_options)
            else:
                ratios = _layer_ratios(*settings)
            if the_plan.stack is None:
                result = PruneResult(_prune_one_pass(model, the_plan.targets, batches, device, home, make_pruner,
                                                     config, ratios, progress))
            else:
                result = _prune_blockwise(model, the_plan, batches, device, make_pruner, config, ratios, progress,
                                          source, writer, state, eval_windows, dtype_check, batch_size, group,
                                          layer_options)
            result.ratios, result.layer_options, result.budget = ratios, layer_options, budget_report
            return result
    finally:
        model.train(was_training)


def _layer_ratios(model, the_plan: Plan, batches, device, home, config, progress, source, batch_size,
                  group: Group) -> dict[str, float]:
    """Each selected layer's sparse_ratio: config.sparse_ratio for all, or with config.allocation "error" the
    shares admm_sparse.allocation picks from a probe pass (the same loop, fast mode at a grid of ratios around
    the global one, weights left dense, so every layer's inputs are the dense model's). A resumed run measures
    again (the same shares: the probe sees only the dense model)."""
    uniform = {name: config.sparse_ratio for name in the_plan.targets}
    if config.allocation == "uniform" or config.sparse_ratio == 0:
        return uniform
    grid = allocation.grid(config.sparse_ratio)
    rows = _probe_pass(model, the_plan, batches, device, home, config, progress, source, batch_size, group,
                       lambda layer, options: allocation.ErrorProbe(layer, grid, **options))
    shapes = {name: tuple(t.shape) for name, t in the_plan.targets.items()}
    return allocation.allocated_ratios(shapes, rows, grid, config.sparse_ratio)


def _budget_settings(model, the_plan: Plan, batches, device, home, config, progress, source, batch_size,
                     group: Group) -> tuple[dict[str, float], dict[str, dict], dict]:
    """Under a size budget (config.target_bits_per_weight): each selected layer's sparse_ratio and its rounding
    options (keep_bits, keep_proportion) from a probe pass (admm_sparse.budget), and what the budget predicted. A
    layer no calibration token reaches is left dense by the loop and counts outside the budget."""
    rows = _probe_pass(model, the_plan, batches, device, home, config, progress, source, batch_size, group,
                       lambda layer, options: budget.SizeProbe(layer, **options))
    measured = {row["name"]: row["settings"] for row in rows if "settings" in row}
    shapes = {name: tuple(t.shape) for name, t in the_plan.targets.items()}
    chosen, predicted = budget.choose(shapes, measured, config.target_bits_per_weight)
    numel = sum(math.prod(shapes[name]) for name in measured)
    ratios = {name: chosen[name][0] if name in chosen else 0.0 for name in the_plan.targets}
    layer_options = {name: {"keep_bits": kb, "keep_proportion": kp} for name, (_, kb, kp) in chosen.items()}
    return ratios, layer_options, {"target_bits_per_weight": config.target_bits_per_weight,
                                   "predicted_bits_per_weight": round(8 * predicted / numel, 4) if numel else None}


def _probe_pass(model, the_plan: Plan, batches, device, home, config, progress, source, batch_size, group: Group,
                make_probe) -> list[dict]:
    """The block loop with every selected layer measured by make_probe(layer, options) and left dense (fast mode,
    no rounding, no reconstruction): the probes' report rows."""
    # sparse_ratio: any valid one (a budget's config has none); the probes choose their own ratios
    probe_config = dataclasses.replace(config, sparse_ratio=0.5, mode="fast", keep_bits=None, round_in_admm=None,
                                       reconstruct_epochs=0, dense_targets=0.0, sequential=False,
                                       allocation="uniform", target_bits_per_weight=None)
    options = probe_config.pruner_options()
    uniform = {name: probe_config.sparse_ratio for name in the_plan.targets}

    def make(name, layer):
        return make_probe(layer, options)

    if the_plan.stack is None:
        return _prune_one_pass(model, the_plan.targets, batches, device, home, make, probe_config, uniform, progress)
    return _prune_blockwise(model, the_plan, batches, device, make, probe_config, uniform, progress, source, None,
                            None, None, None, batch_size, group).rows


def _check_blockwise(config: FloatSparseConfig, batches, group: Group) -> None:
    """The block loop's refusals, raised before any work."""
    if config.reconstruct_epochs > 0:
        if group.size > 1:
            raise ValueError(f"block reconstruction (reconstruct_epochs) runs in one process; this run has "
                             f"{group.size}: run it without torchrun, or set reconstruct_epochs to 0")
        holdout_split(len(batches))  # enough calibration batches to hold some out?
    if len(batches) < group.size:
        raise ValueError(f"{len(batches)} calibration batches for {group.size} processes: each needs at least one; "
                         "give more --num-samples or a smaller --batch-size")


def _prune_blockwise(model, the_plan: Plan, batches, device, make_pruner, config, ratios, progress, source, writer,
                     state, eval_windows, dtype_check, batch_size, group: Group,
                     layer_options: dict[str, dict] | None = None) -> PruneResult:
    """The block loop (see prune_blocks); layer_options: single layers' pruner options (a size budget's)."""
    stack_name, blocks = the_plan.stack
    reconstructing = config.reconstruct_epochs > 0
    per_block = [[t for n, t in the_plan.targets.items() if n.startswith(f"{stack_name}.{i}.")]
                 for i in range(len(blocks))]
    # Later blocks need no inputs, unless they are evaluated, checked or written.
    with_targets = [i for i, targets in enumerate(per_block) if targets]
    every = writer is not None or eval_windows is not None or dtype_check is not None or not with_targets
    last = len(blocks) - 1 if every else with_targets[-1]
    # Three streams of windows share one capture: calibration, evaluation, the dtype check; each rank runs its
    # share of the first two.
    batches = group.split(batches)
    evals = group.split(_batches(eval_windows, batch_size)) if eval_windows is not None else []
    checks = group.split(_batches(dtype_check.windows, batch_size)) if dtype_check is not None else []
    cut = [len(batches), len(batches) + len(evals)]
    with source.outside(stack_name, device):
        hidden, extras = _capture_block_inputs(model, stack_name, blocks, batches + evals + checks, device, last + 1)
    hidden, dense_eval, check_inputs = hidden[:cut[0]], hidden[cut[0]:cut[1]], hidden[cut[1]:]
    pruned_eval = dense_eval
    # The dense model's hidden states beside the pruned ones, for reconstruction and dense targets; block 0's
    # inputs are the same in both streams.
    dense_stream = reconstructing or config.dense_targets > 0
    dense_hidden = list(hidden) if dense_stream else []
    result, first = PruneResult([]), 0
    if state is not None and state.exists():
        first, data, (hidden, dense_eval, pruned_eval, checked, dense_hidden) = state.load(device)
        result.rows, result.block_seconds = data["rows"], data["seconds"]
        result.reconstruction = data["reconstruction"]
        if dtype_check is not None:
            dtype_check.result, dtype_check.hidden = data["dtype_check"], checked or None
    for i in tqdm(range(first, last + 1), initial=first, total=last + 1, desc="blocks", unit="block",
                  disable=not progress):
        start = time.perf_counter()
        calib_extras, eval_extras, check_extras = extras[i][:cut[0]], extras[i][cut[0]:cut[1]], extras[i][cut[1]:]
        with source.block(stack_name, i, device) as block:
            if evals:
                dense_eval = _run_block(block, dense_eval, eval_extras)  # before its layers are pruned
            dense_layer_inputs = None  # for dense targets
            if dense_stream:  # likewise: what the block is fitted to, and the dense inputs dense targets fit
                fitted = [] if config.dense_targets == 0 else \
                    list({id(t.module): t.module for t in per_block[i] if t.kind != "expert"}.values())
                dense_out, recorded = _run_dense_block(block, dense_hidden, calib_extras, fitted)
                if config.dense_targets > 0:
                    dense_layer_inputs = recorded
            if per_block[i]:
                scalers = {} if reconstructing else None  # filled with the pruned layers' channel scalers
                result.rows += _prune_block(block, per_block[i], hidden, calib_extras, config, device, make_pruner,
                                            ratios, progress, f"block {i}", group, scalers,
                                            dense_layer_inputs)
                pruned = [t for t in per_block[i] if t.name in (scalers or {})]
                if pruned:  # fitted to the dense block's outputs
                    result.reconstruction.append(reconstruct_block(
                        block, pruned, hidden, calib_extras, dense_out, epochs=config.reconstruct_epochs,
                        lr=config.reconstruct_lr, rounding=keep_rounding(config, [t.name for t in pruned],
                                                                         layer_options or {}), scalers=scalers,
                        name=f"{stack_name}.{i}", bfloat16=config.reconstruct_dtype == "bfloat16"))
            if dense_stream:
                dense_hidden = dense_out
            if i < last:
                with calibration_autocast(config, device):
                    hidden = _run_block(block, hidden, calib_extras)  # with the pruned weights
                _check_finite_stream(hidden, f"block {i} ({stack_name}.{i})")
            if evals:
                pruned_eval = _run_block(block, pruned_eval, eval_extras)
            if checks:
                dtype_check.step(f"{stack_name}.{i}", i, block, check_inputs, check_extras)
            if writer is not None:
                writer.add({f"{stack_name}.{i}.{name}": t for name, t in block.state_dict().items()})
        devices.empty_cache(device)
        _return_free_memory()
        result.block_seconds.append(time.perf_counter() - start)
        if state is not None:
            checked = dtype_check.hidden if dtype_check is not None and dtype_check.hidden is not None else []
            state.save(i + 1, (hidden, dense_eval, pruned_eval, checked, dense_hidden),
                       {"rows": result.rows, "seconds": result.block_seconds, "reconstruction": result.reconstruction,
                        "dtype_check": dtype_check.result if dtype_check is not None else None})
    if writer is not None or eval_windows is not None:
        with source.outside(stack_name, device):
            if writer is not None:  # a tensor at a time: the embeddings and head are the largest tensors
                for name, t in model.state_dict().items():
                    if not name.startswith(f"{stack_name}."):
                        writer.add({name: t})
            if eval_windows is not None:
                result.perplexity_before = _perplexity(model, stack_name, blocks, evals, dense_eval, device, group)
                result.perplexity_after = _perplexity(model, stack_name, blocks, evals, pruned_eval, device, group)
    if dtype_check is not None and group.size > 1:
        dtype_check.merge(group.gather_objects(dtype_check.result))
    result.peak_memory_bytes = peak_memory_bytes()
    return result


class _Injector(nn.Module):
    """Stands in for a block: the first one returns the given final hidden states (the stack's output), the
    others pass them on, so that what follows the stack (final norm, head) runs as the model runs it."""

    def __init__(self, outputs: torch.Tensor | None = None):
        super().__init__()
        self.outputs = outputs

    def forward(self, *args, **kwargs):
        return self.outputs if self.outputs is not None else (args[0] if args else kwargs["hidden_states"])


def _perplexity(model, stack_name, blocks, windows: list[torch.Tensor], finals: list[torch.Tensor], device,
                group: Group) -> float:
    """exp(mean next-token NLL) of windows whose final hidden states (the stack's outputs) are `finals`, over
    every rank's windows. The batches' sums are added exactly rounded (math.fsum), so in any order: the
    same figure from any number of processes."""
    parent, attr = _parent(model, stack_name)
    sums = []
    try:
        for batch, final in zip(windows, finals):
            setattr(parent, attr, nn.ModuleList([_Injector(final)] + [_Injector() for _ in range(len(blocks) - 1)]))
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            sums.append(nll_sum(logits, batch))
    finally:
        setattr(parent, attr, blocks)
    sums = [pair for part in group.gather_objects(sums) for pair in part]
    return math.exp(math.fsum(nll for nll, _ in sums) / sum(count for _, count in sums))


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


_LIBC = _libc()


def _return_free_memory() -> None:
    """Give the memory freed with a block back to the OS: glibc keeps freed chunks in its heap, where
    fragmentation would carry each block's leftovers into the next and make the footprint grow with depth."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def peak_memory_bytes() -> int:
    """Peak resident memory of this process so far: VmHWM on Linux (getrusage's maxrss is kept across exec, so
    a process started by a large one would report its parent's size), maxrss elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prune_one_pass(model, selected, batches, device, home, make_pruner, config, ratios, progress) -> list[dict]:
    def run():
        with calibration_autocast(config, device):
            for batch in batches:
                _call_model(model, batch.to(device))

    model.to(device)
    try:
        return _prune_targets(list(selected.values()), run, model, make_pruner, ratios, progress,
                              "layers", Group())
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
    """The per-layer report as a fixed-width text table, with a totals line. bits/w: the written weight's
    compressed bits per weight (admm_sparse.size), where the job measured it."""
    width = max([len("layer")] + [len(r["name"]) for r in rows])
    header = (f"{'layer':<{width}} {'shape':>11} {'sparsity':>8} {'rel.err':>8} {'seconds':>8} {'damping':>9} "
              f"{'bits/w':>6}")
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = "x".join(str(s) for s in r.get("shape", ()))
        damping = r.get("damping")
        damping = f"{damping:9.3g}" if isinstance(damping, (int, float)) else f"{'-':>9}"
        bits = (r.get("size") or {}).get("bits_per_weight")
        bits = f"{bits:6.2f}" if isinstance(bits, (int, float)) else f"{'-':>6}"
        lines.append(f"{r['name']:<{width}} {shape:>11} {r['sparsity']:8.4f} {r['relative_error']:8.4f} "
                     f"{r['seconds']:8.2f} {damping} {bits}")
    s = summarize(rows)
    lines.append("-" * len(header))
    lines.append(f"{s['layers']} layers, sparsity {s['sparsity']:.4f}, mean relative error "
                 f"{s['mean_relative_error']:.4f}, {s['seconds']:.1f} s pruning")
    return "\n".join(lines)
