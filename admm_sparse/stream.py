"""The block loop's streams of hidden states, one tensor per batch: block 0's inputs captured from the model (with
the arguments the model passes each block), a block run over a stream, the dense stream's block outputs and layer
inputs, and the perplexity of a stream's final hidden states."""
from __future__ import annotations

import inspect
import math
from contextlib import nullcontext

import torch
from torch import nn

from . import device as devices
from .config import FloatSparseConfig
from .distributed import Group
from .evaluate import nll_sum
from .host_stream import HOST, HostStream, hold, like
from .layer import all_finite
from .reconstruct import block_output


def calibration_autocast(config: FloatSparseConfig, device: torch.device):
    """The context the calibration forwards run in (config.calibration_dtype): bfloat16 or float16 autocast, or
    nothing. The evaluation windows and the float16 check always run in the model's own dtype. The statistics
    are float32 products of each layer's input whatever the forwards' dtype (AdmmPruner.add_batch)."""
    dtype = config.calibration_dtype
    if dtype == "auto":
        dtype = "bfloat16" if config.mode == "fast" and devices.gemm_dtype(device) == torch.bfloat16 else "model"
    return nullcontext() if dtype == "model" else torch.autocast(device.type, dtype=getattr(torch, dtype))


def check_finite_stream(hidden: list[torch.Tensor], where: str) -> None:
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

    def __init__(self, block: nn.Module, records: list, last: bool, keep):
        super().__init__()
        # Kept out of the module tree so that moving the model does not move the block.
        self.__dict__["_block"] = block
        self.__dict__["_records"] = records
        self.__dict__["_last"] = last
        self.__dict__["_keep"] = keep  # hidden -> what to record of it (only block 0's are needed)

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        self._records.append((self._keep(hidden), rest, kwargs))
        if self._last:
            raise _StopForward
        return hidden

    def __getattr__(self, name):
        # Models read block attributes while looping (e.g. attention_type for sliding-window masks).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


def parent_module(model: nn.Module, name: str) -> tuple[nn.Module, str]:
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


def capture_block_inputs(model, stack_name, blocks, batches, device, count, host: bool = False) -> tuple[list, list]:
    """Block 0's hidden states for each batch (a stream: host_stream.hold), and for each of the first `count` blocks
    the (extra args, kwargs) the model passes it for each batch, on `device` (where the caller put what precedes
    the stack). The model runs with recorders in place of the blocks: the embeddings and whatever else precedes
    the stack run, the blocks do not. host: block 0's hidden states kept in host memory as they are recorded."""
    records: list[list] = [[] for _ in range(count)]
    parent, attr = parent_module(model, stack_name)

    def keep(i):
        return (lambda h: h.detach().to(HOST) if host else h) if i == 0 else (lambda h: None)

    setattr(parent, attr, nn.ModuleList([_Recorder(blocks[i], records[i], i == count - 1, keep(i)) if i < count
                                         else blocks[i] for i in range(len(blocks))]))
    try:
        for batch in batches:
            try:
                call_model(model, batch.to(device))
            except _StopForward:
                pass
    finally:
        setattr(parent, attr, blocks)
    if any(len(r) != len(batches) for r in records):
        raise RuntimeError(f"the model did not call each block of its stack '{stack_name}' once per batch; "
                           "this model is not supported by the block-by-block pipeline")
    intern = _Interner()

    def without_cache(kwargs: dict) -> dict:
        return {**kwargs, "use_cache": False} if "use_cache" in kwargs else kwargs

    extras = [[(intern(args), {k: intern(v) for k, v in without_cache(kwargs).items()})
               for _, args, kwargs in block_records] for block_records in records]
    return hold((h for h, _, _ in records[0]), device, host), extras


def call_model(model, input_ids):
    # Hugging Face models take input_ids and must not build a KV cache; plain modules take the tensor.
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params:
        return model(input_ids)
    return model(input_ids=input_ids, **({"use_cache": False} if "use_cache" in params else {}))


def run_block(block, hidden, extras) -> list[torch.Tensor] | HostStream:
    """The block's outputs on each batch of `hidden`, held as `hidden` is (host_stream.like)."""
    return like(hidden, (block_output(block, h, args, kwargs) for h, (args, kwargs) in zip(hidden, extras)))


def run_dense_block(block: nn.Module, hidden, extras, modules: list[nn.Module]) -> tuple[list, dict]:
    """The block's outputs on `hidden` (run before any of its layers is pruned), and {id(module): its input, per
    batch (None where it did not run)} for each of `modules`: the dense inputs dense targets fit, recorded in the
    same pass, in the model's dtype (also where the calibration passes run in bfloat16 autocast). Held until their
    layers are pruned: about one hidden-state stream per distinct input (q/k/v share one, as do gate/up). All of
    them held as `hidden` is (in host memory as they are made, for a HostStream)."""
    recorded: dict[int, list] = {id(m): [] for m in modules}
    to_host = isinstance(hidden, HostStream)

    def store(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(HOST) if to_host else t.detach()

    def record(module, inputs, kwargs):
        batch = recorded[id(module)]
        if len(batch) == len(outputs):  # its first call in this batch
            batch.append(store(inputs[0] if inputs else next(iter(kwargs.values()))))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules]
    outputs: list[torch.Tensor] = []
    try:
        for h, (args, kwargs) in zip(hidden, extras):
            outputs.append(store(block_output(block, h, args, kwargs)))
            for batch in recorded.values():
                batch.extend([None] * (len(outputs) - len(batch)))
    finally:
        for handle in handles:
            handle.remove()
    return like(hidden, outputs), {key: like(hidden, batches) for key, batches in recorded.items()}


def calib_batches(calib, batch_size: int) -> list[torch.Tensor]:
    if isinstance(calib, torch.Tensor):
        calib = calib if calib.dim() == 2 else calib.reshape(1, -1)
        return list(calib.split(batch_size))
    return [c if c.dim() == 2 else c.reshape(1, -1) for c in calib]


class _Injector(nn.Module):
    """Stands in for a block: the first one returns the given final hidden states (the stack's output), the
    others pass them on, so that what follows the stack (final norm, head) runs as the model runs it."""

    def __init__(self, outputs: torch.Tensor | None = None):
        super().__init__()
        self.outputs = outputs

    def forward(self, *args, **kwargs):
        return self.outputs if self.outputs is not None else (args[0] if args else kwargs["hidden_states"])


def head_logits(model, stack_name, blocks, batch: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """The model's logits for token windows `batch` whose final hidden states (the stack's output) are `final`:
    what follows the stack (final norm, head) runs as the model runs it, the blocks do not."""
    parent, attr = parent_module(model, stack_name)
    setattr(parent, attr, nn.ModuleList([_Injector(final)] + [_Injector() for _ in range(len(blocks) - 1)]))
    try:
        return model(input_ids=batch, use_cache=False).logits
    finally:
        setattr(parent, attr, blocks)


def stream_perplexity(model, stack_name, blocks, windows: list[torch.Tensor], finals: list[torch.Tensor], device,
                group: Group) -> float:
    """exp(mean next-token NLL) of windows whose final hidden states (the stack's outputs) are `finals`, over
    every rank's windows. The batches' sums are added exactly rounded (math.fsum), so in any order: the
    same figure from any number of processes."""
    sums = []
    for batch, final in zip(windows, finals):
        batch = batch.to(device)
        sums.append(nll_sum(head_logits(model, stack_name, blocks, batch, final), batch))
    sums = [pair for part in group.gather_objects(sums) for pair in part]
    return math.exp(math.fsum(nll for nll, _ in sums) / sum(count for _, count in sums))
