"""Block reconstruction: after a block's layers are pruned, fit their kept weights jointly, masks fixed, so that
the pruned block run on the pruned model's hidden states reproduces the dense block's output on the dense
model's hidden states (the block loop carries both streams when this is on; see pipeline._prune_blockwise).

Per block, with X the pruned stream's inputs and Y = dense block(dense stream), over the calibration batches:
minimise the relative MSE  sum |block(X) - Y|^2 / sum |Y|^2  over the pruned layers' [out, in] kept weights only
(biases, norms, routers and unpruned layers stay as they are), with the fit admm_sparse.fit shares with
distillation: Adam on float32 masters, masks fixed, each layer's step size relative to its kept weights' RMS (the
loss is divided by the mean square of Y, so one learning rate suits every layer and model scale), the step size
constant or cosine-decayed, every 8th calibration batch held out to keep the best epoch and stop the fit (epoch 0
is the block as pruned: never worse on the held-out batches than no reconstruction). The block itself runs in its
own dtype, or with `bfloat16` its fitting forwards and backwards in bfloat16 autocast (faster where bfloat16 GEMMs
are). With keep-bit rounding (a layer's keep_bits not None) the fit works on the float16 keep-bit grid,
straight-through (fit.Weights): the forwards (the loss, the held-out error, the kept result) see the weights as
delivered, rounded with keepbits.apply_keepbits and the layer's own channel scaler (kept from its pruner), while
the gradients move the unrounded masters. The rounding is the post-hoc one, also where the pruner rounded inside
ADMM (round_in_admm); a weight that the rounding flushes to zero stays a weight the fit may move.
The report per block: the held-out relative MSE before and after, the epochs run and the epoch kept. (No error
over the fitted batches: two more passes over them, about a tenth of the fit's time, for the report only.)

Sub-blocks (find_sub_blocks; config.reconstruct_unit "sub-block"): the same fit, twice per block. First the
attention side's layers, the block run only up to the module where the residual stream between attention and MLP
enters the MLP side (`until`), fitted to the dense stream's value there; then the MLP side's layers, the whole
block run (the attention side as fitted, its weights fixed), fitted to the dense block's output.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .fit import Weights, fit, holdout_split
from .host_stream import subset
from .targets import Target, same_tensor


class _Reached(Exception):
    """Raised by the split module's hook: the block has computed the attention sub-block's output."""


def block_output(block: nn.Module, hidden: torch.Tensor, args, kwargs, until: nn.Module | None = None
                 ) -> torch.Tensor:
    """The hidden states a block returns for `hidden` (blocks return a tensor, or a tuple led by it); with `until`,
    the first input of that submodule instead (the block stops there): the attention sub-block's output."""
    if until is None:
        out = block(hidden, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out
    reached = []

    def stop(module, inputs, kwargs):
        reached.append(inputs[0] if inputs else next(iter(kwargs.values())))
        raise _Reached

    handle = until.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        block(hidden, *args, **kwargs)
    except _Reached:
        return reached[0]
    finally:
        handle.remove()
    raise RuntimeError(f"the block did not call {type(until).__name__} on this batch: the sub-block split found on "
                       "the first batch does not hold here; use reconstruct_unit block")


@dataclass
class SubBlocks:
    """A block's split into its attention sub-block and the rest (its MLP): `split` is the submodule whose first
    input is the residual stream between the two (the MLP side's norm), `attention` and `mlp` the pruned targets
    of each side."""

    split: nn.Module
    attention: list[Target]
    mlp: list[Target]


def find_sub_blocks(block: nn.Module, targets: Sequence[Target], hidden: torch.Tensor, extras) -> SubBlocks | None:
    """The attention / MLP split of a block, found from its data flow on one batch: the block's direct children are
    hooked; the first child holding targets is the attention side; the split is the first child called after it whose
    input is a tensor made after the attention returned (the residual stream: x + attention's output, or its
    normalised form's input), before the next child with targets. None where there is no such point (attention
    and MLP in parallel on one input, as in GPT-J or Falcon; a block whose targets are all on one side)."""
    children = dict(block.named_children())
    owner = {}  # target -> the direct child holding it
    for t in targets:
        for name, child in children.items():
            if any(m is t.module for m in child.modules()):
                owner[t.name] = name
    calls: list[tuple[str, torch.Tensor | None, Any]] = []  # (child, its first input, its output), in call order

    def record(name):
        def hook(module, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()), None)
            calls.append((name, x if isinstance(x, torch.Tensor) else None, output))
        return hook

    handles = [child.register_forward_hook(record(name), with_kwargs=True) for name, child in children.items()]
    try:
        args, kwargs = extras
        with torch.no_grad():
            block(hidden, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    holding = set(owner.values())
    first = next((i for i, (name, _, _) in enumerate(calls) if name in holding), None)
    if first is None:
        return None
    attention_child = calls[first][0]
    seen = [hidden]  # tensors that existed before the attention side returned
    for _, x, out in calls[: first + 1]:
        seen += [x] + (list(out) if isinstance(out, (tuple, list)) else [out])
    seen = [t for t in seen if isinstance(t, torch.Tensor)]
    for name, x, _ in calls[first + 1:]:
        if name == attention_child or x is None:
            continue
        if any(same_tensor(x, t) for t in seen):
            if name in holding:  # the next side reads a tensor made before attention returned: parallel
                return None
            continue
        attention = [t for t in targets if owner.get(t.name) == attention_child]
        mlp = [t for t in targets if owner.get(t.name) != attention_child]
        return SubBlocks(children[name], attention, mlp) if attention and mlp else None
    return None


def relative_mse(block: nn.Module, inputs: Sequence[torch.Tensor], extras: Sequence, targets: Sequence[torch.Tensor],
                 until: nn.Module | None = None) -> float:
    """sum |block(x) - y|^2 / sum |y|^2 over the batches, in float64 sums; block(x) stops at `until`
    (block_output)."""
    err = torch.zeros((), dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for h, (args, kwargs), y in zip(inputs, extras, targets):
            y = y.float()
            err += (block_output(block, h, args, kwargs, until).float() - y).square().sum(dtype=torch.float64).cpu()
            total += y.square().sum(dtype=torch.float64).cpu()
    return (err / total.clamp_min(torch.finfo(torch.float64).tiny)).item()


def reconstruct_block(block: nn.Module, targets: Sequence[Target], inputs: Sequence[torch.Tensor], extras: Sequence,
                      dense_outputs: Sequence[torch.Tensor], *, epochs: int, lr: float, rounding: dict | None = None,
                      scalers: dict | None = None, name: str = "", bfloat16: bool = False,
                      until: nn.Module | None = None, schedule: str = "constant") -> dict:
    """Fit the pruned `targets` of `block` (weights in place, masks fixed) so that block(inputs[b]) approaches
    dense_outputs[b]; see the module's docstring. extras[b] = (args, kwargs) the block takes with inputs[b].
    rounding: {target name: (keep_bits, keep_proportion, salience_bits), or None for no rounding}, the keep-bit
    rounding re-applied after every step (default none); scalers: {target name: channel scaler} of each target's
    pruner, needed where a target is rounded.
    bfloat16: the fit's forwards and backwards in bfloat16 autocast (the masters, Adam and the held-out error that
    picks the kept epoch stay in float32 / the block's dtype).
    schedule: the step size over the fit: "constant", or "cosine" (decayed to 0 over epochs x fitted batches steps).
    until: fit the block's output at that submodule's input instead (block_output): the attention sub-block, whose
    dense_outputs are then the dense stream's inputs of that submodule.
    Returns the block's report: the held-out batches' relative MSE before and after, the batch counts, epochs run
    and the epoch kept (0: the block as pruned), seconds."""
    start = time.perf_counter()
    rounding = {t.name: (rounding or {}).get(t.name) for t in targets}
    if any(rounding.values()):
        missing = [t.name for t in targets if rounding[t.name] is not None and (scalers or {}).get(t.name) is None]
        if missing:
            raise ValueError(f"block reconstruction re-applies the keep-bit rounding with each layer's channel scaler, "
                             f"which the pruner of {missing[0]} does not have (the ADMM pruner's `scaler`); pass "
                             "keep_bits=None (--keep-bits none) or use the ADMM pruner")
    fitted, held = holdout_split(len(inputs))
    fit_x, fit_e, fit_y = subset(inputs, fitted), subset(extras, fitted), subset(dense_outputs, fitted)
    held_x, held_e, held_y = subset(inputs, held), subset(extras, held), subset(dense_outputs, held)
    scale = sum(y.float().square().sum(dtype=torch.float64).item() for y in fit_y) \
        / max(sum(y.numel() for y in fit_y), 1) or 1.0  # mean square of the dense outputs: the loss's unit

    def loss(b: int) -> torch.Tensor:
        (args, kwargs), x = fit_e[b], fit_x[b]  # read once: a HostStream copies it to the device
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bfloat16):
            out = block_output(block, x, args, kwargs, until)
        return (out.float() - fit_y[b].float()).square().mean() / scale

    report = fit(block, Weights(targets, lr, rounding, scalers or {}), len(fitted), loss,
                 lambda: relative_mse(block, held_x, held_e, held_y, until), epochs=epochs, schedule=schedule)
    return {"block": name, "fit_batches": len(fitted), "heldout_batches": len(held), **report,
            "seconds": time.perf_counter() - start}
