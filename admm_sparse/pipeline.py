"""Block-by-block float_sparse pruning of a whole model (SPEC §4): the block loop.

Decoder models (anything with a stack of decoder blocks: LLaMA, Qwen, Mistral, Gemma, Phi-3, OPT, GPT-2,
Mixtral, Qwen3-MoE, DeepSeek-V3, ...):
1. capture block 0's inputs for every calibration batch, and the keyword arguments the model passes each
   block (attention masks, position ids / embeddings: they differ between sliding-window and global
   blocks), by running the model with recorders in place of the blocks (admm_sparse.stream);
2. for each block: move it to the compute device (a model source: admm_sparse.source), hook its selected
   layers (admm_sparse.plan chose them; admm_sparse.targets reads Linears, Conv1Ds, experts of fused MoE
   parameters), run the batches, prune those layers (admm_sparse.feed), (optionally) fit their kept weights to
   the dense block's outputs (admm_sparse.reconstruct), run the block again with the pruned weights to make the
   next block's inputs, move it back. Only one block is on the compute device at a time;
3. (optionally) distillation: the whole pruned model fitted to the dense model's next-token distributions
   (admm_sparse.distill; the model on the device at once), then each block evaluated, checked and written.
Models without a block stack fall back to collecting every selected layer in one pass of the whole model.
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import allocation, budget
from . import device as devices
from . import distill as distillation
from .config import FloatSparseConfig
from .distributed import Group
from .feed import PrunerFactory, prune_block, prune_targets
from .fit import holdout_split
from .host_stream import hold
from .layer import AdmmPruner
from .plan import Plan, make_plan
from .reconstruct import SubBlocks, find_sub_blocks, reconstruct_block
from .source import InMemorySource
from .stream import (calib_batches, call_model, calibration_autocast, capture_block_inputs, check_finite_stream,
                     run_block, run_dense_block, stream_perplexity)

# The fits after pruning (their epochs option, and what they are called in messages): refused alike where they
# cannot run (no stack of blocks, several processes, too few batches to hold some out).
FITS = (("reconstruct_epochs", "block reconstruction"), ("distill_epochs", "distillation"))


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
    distillation: dict = field(default_factory=dict)  # with config.distill_epochs > 0: distill.distill's report
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
    config.distill_epochs > 0: distillation (admm_sparse.distill) once every block is pruned, to the dense model's
    next-token distributions from the dense stream's final hidden states; one process, the model in memory (an
    InMemorySource), no resume state; the evaluation, float16 check and writer then see each block after it.
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
    batches = calib_batches(calib, batch_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if the_plan.stack is None:
                if writer is not None or eval_windows is not None or dtype_check is not None or group.size > 1:
                    raise ValueError("this model has no stack of blocks: it can only be pruned in memory, as a whole")
                for option, what in FITS:
                    if getattr(config, option):
                        raise ValueError(f"{what} ({option}) needs a stack of blocks; this model has none: set "
                                         f"{option} to 0")
            else:
                _check_blockwise(model, config, batches, group, source, state)  # before any work, probes included
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
                                       reconstruct_epochs=0, distill_epochs=0, dense_targets=0.0, sequential=False,
                                       allocation="uniform", target_bits_per_weight=None)
    options = probe_config.pruner_options()
    uniform = {name: probe_config.sparse_ratio for name in the_plan.targets}

    def make(name, layer):
        return make_probe(layer, options)

    if the_plan.stack is None:
        return _prune_one_pass(model, the_plan.targets, batches, device, home, make, probe_config, uniform, progress)
    return _prune_blockwise(model, the_plan, batches, device, make, probe_config, uniform, progress, source, None,
                            None, None, None, batch_size, group).rows


def _check_blockwise(model, config: FloatSparseConfig, batches, group: Group, source, state) -> None:
    """The block loop's refusals, raised before any work."""
    for option, what in FITS:
        if getattr(config, option) > 0:
            if group.size > 1:
                raise ValueError(f"{what} ({option}) runs in one process; this run has {group.size}: run it without "
                                 f"torchrun, or set {option} to 0")
            holdout_split(len(batches), what)  # enough calibration batches to hold some out?
    if config.distill_epochs > 0:
        if not isinstance(source, InMemorySource):
            raise ValueError("distillation (distill_epochs) fits the whole model at once, so the model must be in "
                             "memory, not streamed block by block: load it whole, or set distill_epochs to 0")
        distillation.check_model(model)
        if state is not None:
            raise ValueError("distillation (distill_epochs) changes every block after the loop, so a run with it "
                             "keeps no per-block state to resume from: pass no resume state, or set distill_epochs "
                             "to 0")
    if len(batches) < group.size:
        raise ValueError(f"{len(batches)} calibration batches for {group.size} processes: each needs at least one; "
                         "give more --num-samples or a smaller --batch-size")


def _prune_blockwise(model, the_plan: Plan, batches, device, make_pruner, config, ratios, progress, source, writer,
                     state, eval_windows, dtype_check, batch_size, group: Group,
                     layer_options: dict[str, dict] | None = None) -> PruneResult:
    """The block loop (see prune_blocks); layer_options: single layers' pruner options (a size budget's)."""
    stack_name, blocks = the_plan.stack
    reconstructing = config.reconstruct_epochs > 0
    distilling = config.distill_epochs > 0  # then the blocks are finished (evaluated, checked, written) after it
    per_block = [[t for n, t in the_plan.targets.items() if n.startswith(f"{stack_name}.{i}.")]
                 for i in range(len(blocks))]
    # Later blocks need no inputs, unless they are evaluated, checked or written.
    with_targets = [i for i, targets in enumerate(per_block) if targets]
    every = writer is not None or eval_windows is not None or dtype_check is not None or not with_targets \
        or distilling  # distillation's dense distributions: the dense stream through the whole stack
    last = len(blocks) - 1 if every else with_targets[-1]
    # Four streams of windows share one capture: calibration, evaluation, the dtype check, and distillation's
    # windows sampled from the dense model (carried through the dense blocks only, to the dense final states the
    # fit matches); each rank runs its share of the first two.
    batches = group.split(batches)
    evals = group.split(calib_batches(eval_windows, batch_size)) if eval_windows is not None else []
    checks = group.split(calib_batches(dtype_check.windows, batch_size)) if dtype_check is not None else []
    sampled = []
    if distilling and config.distill_samples:
        sampled, sampling_seconds = distillation.sample_windows(
            model, batches, config.distill_samples, device, lambda: calibration_autocast(config, device))
    cut = [len(batches), len(batches) + len(evals), len(batches) + len(evals) + len(checks)]
    host = config.stream_memory == "host"  # the streams in host memory, each batch moved to the device to be read
    with source.outside(stack_name, device):
        hidden, extras = capture_block_inputs(model, stack_name, blocks, batches + evals + checks + sampled, device,
                                              last + 1, host=host)
    hidden, dense_eval, check_inputs, dense_sampled = (hidden[:cut[0]], hidden[cut[0]:cut[1]], hidden[cut[1]:cut[2]],
                                                       hidden[cut[2]:])
    pruned_eval = dense_eval
    # The dense model's hidden states beside the pruned ones, for reconstruction, dense targets and distillation;
    # block 0's inputs are the same in both streams.
    dense_stream = reconstructing or config.dense_targets > 0 or distilling
    dense_hidden = hidden[:] if dense_stream else []
    result, first = PruneResult([]), 0
    distilled, distill_scalers = [], {}  # the pruned layers and their channel scalers, for distillation

    def finish(block, i) -> None:
        """A block whose weights are final: the pruned evaluation stream through it, the float16 check, the writer."""
        nonlocal pruned_eval
        if evals:
            pruned_eval = run_block(block, pruned_eval, extras[i][cut[0]:cut[1]])
        if checks:
            dtype_check.step(f"{stack_name}.{i}", i, block, check_inputs, extras[i][cut[1]:cut[2]])
        if writer is not None:
            writer.add({f"{stack_name}.{i}.{name}": t for name, t in block.state_dict().items()})

    if state is not None and state.exists():
        first, data, streams = state.load()
        hidden, dense_eval, pruned_eval, checked, dense_hidden = (hold(stream, device, host) for stream in streams)
        result.rows, result.block_seconds = data["rows"], data["seconds"]
        result.reconstruction = data["reconstruction"]
        if dtype_check is not None:
            dtype_check.result, dtype_check.hidden = data["dtype_check"], checked or None
    for i in tqdm(range(first, last + 1), initial=first, total=last + 1, desc="blocks", unit="block",
                  disable=not progress):
        start = time.perf_counter()
        calib_extras, eval_extras, sampled_extras = extras[i][:cut[0]], extras[i][cut[0]:cut[1]], extras[i][cut[2]:]
        with source.block(stack_name, i, device) as block:
            if evals:
                dense_eval = run_block(block, dense_eval, eval_extras)  # before its layers are pruned
            if sampled:
                dense_sampled = run_block(block, dense_sampled, sampled_extras)
            dense_layer_inputs = None  # for dense targets
            sub_blocks = None  # reconstruct_unit "sub-block": the block's attention / MLP split
            if dense_stream:  # likewise: what the block is fitted to, and the dense inputs dense targets fit
                fitted = [] if config.dense_targets == 0 else \
                    list({id(t.module): t.module for t in per_block[i] if t.kind != "expert"}.values())
                if reconstructing and config.reconstruct_unit == "sub-block" and per_block[i]:
                    sub_blocks = find_sub_blocks(block, per_block[i], hidden[0], calib_extras[0])
                split = [sub_blocks.split] if sub_blocks is not None else []  # its dense input: the attention's target
                dense_out, recorded = run_dense_block(block, dense_hidden, calib_extras, fitted + split)
                if config.dense_targets > 0:
                    dense_layer_inputs = recorded
            if per_block[i]:
                # filled with the pruned layers' channel scalers (a layer no token reached stays dense, without one)
                scalers = {} if reconstructing or distilling else None
                result.rows += prune_block(block, per_block[i], hidden, calib_extras, config, device, make_pruner,
                                           ratios, progress, f"block {i}", group, scalers, dense_layer_inputs)
                pruned = [t for t in per_block[i] if t.name in (scalers or {})]
                if distilling:
                    distilled += pruned
                    distill_scalers.update(scalers)
                if reconstructing and pruned:  # fitted to the dense block's outputs
                    result.reconstruction += _reconstruct(block, pruned, hidden, calib_extras, dense_out, recorded,
                                                          sub_blocks, config, scalers, layer_options or {},
                                                          f"{stack_name}.{i}")
            if dense_stream:
                dense_hidden = dense_out
            if i < last:
                with calibration_autocast(config, device):
                    hidden = run_block(block, hidden, calib_extras)  # with the pruned weights
                check_finite_stream(hidden, f"block {i} ({stack_name}.{i})")
            if not distilling:
                finish(block, i)
        devices.empty_cache(device)
        _return_free_memory()
        result.block_seconds.append(time.perf_counter() - start)
        if state is not None:
            checked = dtype_check.hidden if dtype_check is not None and dtype_check.hidden is not None else []
            state.save(i + 1, (hidden, dense_eval, pruned_eval, checked, dense_hidden),
                       {"rows": result.rows, "seconds": result.block_seconds, "reconstruction": result.reconstruction,
                        "dtype_check": dtype_check.result if dtype_check is not None else None})
    if distilling:
        hidden = None  # the pruned stream: the fit runs the model from the token ids, so its memory is freed first
        if distilled:
            rounding = keep_rounding(config, [t.name for t in distilled], layer_options or {})
            result.distillation = distillation.distill(
                model, stack_name, blocks, distilled, batches, dense_hidden, device, epochs=config.distill_epochs,
                lr=config.distill_lr, schedule=config.distill_schedule, rounding=rounding, scalers=distill_scalers,
                bfloat16=config.reconstruct_dtype == "bfloat16", sampled=sampled, sampled_finals=dense_sampled)
            if sampled:
                result.distillation["sampling_seconds"] = sampling_seconds
        for i in range(last + 1):
            with source.block(stack_name, i, device) as block:
                finish(block, i)
    if writer is not None or eval_windows is not None:
        with source.outside(stack_name, device):
            if writer is not None:  # a tensor at a time: the embeddings and head are the largest tensors
                for name, t in model.state_dict().items():
                    if not name.startswith(f"{stack_name}."):
                        writer.add({name: t})
            if eval_windows is not None:
                result.perplexity_before, result.perplexity_after = (
                    stream_perplexity(model, stack_name, blocks, evals, finals, device, group)
                    for finals in (dense_eval, pruned_eval))
    if dtype_check is not None and group.size > 1:
        dtype_check.merge(group.gather_objects(dtype_check.result))
    result.peak_memory_bytes = peak_memory_bytes()
    return result


def _reconstruct(block, pruned, hidden, extras, dense_out, recorded: dict, sub_blocks: SubBlocks | None, config,
                 scalers: dict, layer_options: dict, name: str) -> list[dict]:
    """Block reconstruction of a pruned block (admm_sparse.reconstruct): the whole block fitted to the dense block's
    outputs; or, split into sub-blocks, first its attention side to the dense stream's residual between the two
    sides (the split module's recorded dense input), then its MLP side to the dense block's outputs, on the
    inputs the fitted attention side makes. One report per fit."""
    if sub_blocks is None:
        parts = [(None, pruned, dense_out, None)]
    else:
        parts = [("attention", sub_blocks.attention, recorded[id(sub_blocks.split)], sub_blocks.split),
                 ("mlp", sub_blocks.mlp, dense_out, None)]
    names = {t.name for t in pruned}
    reports = []
    for part, targets, outputs, until in parts:
        targets = [t for t in targets if t.name in names]
        if not targets:
            continue
        report = reconstruct_block(block, targets, hidden, extras, outputs, epochs=config.reconstruct_epochs,
                                   lr=config.reconstruct_lr, scalers=scalers, name=name,
                                   rounding=keep_rounding(config, [t.name for t in targets], layer_options),
                                   bfloat16=config.reconstruct_dtype == "bfloat16", until=until,
                                   schedule=config.reconstruct_schedule)
        reports.append({**report, "part": part} if part else report)
    return reports


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
                call_model(model, batch.to(device))

    model.to(device)
    try:
        return prune_targets(list(selected.values()), run, model, make_pruner, ratios, progress,
                             "layers", Group())
    finally:
        model.to(home)
