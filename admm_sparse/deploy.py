"""Does the model stay finite in the dtype it will run in? The Atlas 300I Duo computes in float16
(largest finite value 65504): a model whose activations go beyond that gives inf/NaN on the card even
though it runs fine in float32 here.

`DtypeCheck` runs a copy of each block in that dtype, one block at a time on the previous block's outputs
(one forward pass in all), and names the first block, and the first module inside it, whose outputs are not
finite; the block loop runs it on the pruned blocks as they pass, `check_dtype` on a whole model. The model
itself is never cast: float32 -> float16 -> float32 is not exact.
"""
from __future__ import annotations

import copy

import torch

from .plan import find_block_stack
from .source import InMemorySource
from .stream import capture_block_inputs, run_block

CHECK_WINDOWS = 4  # calibration windows the check after pruning runs: enough to see the activations' scale


def _cast(value, dtype: torch.dtype):
    """Floating tensors, also inside tuples (position embeddings), in `dtype`. Clamped to its range first:
    a model built in that dtype fills its attention masks with finfo.min, not with -inf."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        info = torch.finfo(dtype)
        return value.clamp(info.min, info.max).to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _watch(block: torch.nn.Module, prefix: str) -> tuple[list[str], list]:
    """Forward hooks on every submodule of `block`; the list fills with the full name of the first one
    whose output is not finite (the innermost module finishes first, so it is where the overflow starts)."""
    found: list[str] = []

    def hook(name):
        def check(module, args, output):
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            if not found and any(isinstance(o, torch.Tensor) and o.is_floating_point() and not torch.isfinite(o).all()
                                 for o in outputs):
                found.append(prefix + name)
        return check

    handles = [m.register_forward_hook(hook(name)) for name, m in block.named_modules() if name]
    return found, handles


def _max_finite(tensors: list[torch.Tensor]) -> float:
    return max(float(torch.where(torch.isfinite(t), t.abs(), 0).max()) for t in tensors)


class DtypeCheck:
    """Runs a copy of each block in `dtype`, block after block, on a few windows' hidden states, and keeps the
    first block (and module inside it) whose output is not finite. The block loop (pipeline.prune_blocks)
    steps it with each pruned block, so it costs one forward of those windows; check_dtype steps it alone.
    `result`: {"ok", "dtype", "windows", "max_abs", "block", "module"} (see check_dtype)."""

    def __init__(self, dtype: torch.dtype, windows: torch.Tensor):
        self.dtype, self.windows = dtype, windows  # token windows [n, seq_len]
        self.hidden: list[torch.Tensor] | None = None  # the last checked block's outputs
        self.result = {"ok": True, "dtype": str(dtype).removeprefix("torch."), "windows": int(windows.shape[0]),
                       "max_abs": 0.0, "block": None, "module": None}

    def step(self, name: str, i: int, block: torch.nn.Module, hidden: list[torch.Tensor], extras: list) -> None:
        """Run block i (full name `name`) in the dtype on `hidden` (the first block's inputs; later blocks take
        the previous one's outputs); nothing once a block has overflowed, since the rest only see inf/NaN."""
        if not self.result["ok"]:
            return
        inputs = [h.to(self.dtype) for h in hidden] if self.hidden is None else self.hidden
        extras = [(_cast(args, self.dtype), {k: _cast(v, self.dtype) for k, v in kwargs.items()})
                  for args, kwargs in extras]
        copied = copy.deepcopy(block).to(dtype=self.dtype).eval()
        found, handles = _watch(copied, f"{name}.")
        try:
            self.hidden = run_block(copied, inputs, extras)
        finally:
            for handle in handles:
                handle.remove()
        self.result["max_abs"] = max(self.result["max_abs"], _max_finite(self.hidden))
        if not all(torch.isfinite(h).all() for h in self.hidden):
            self.result.update(ok=False, block=i, module=found[0] if found else None)


    def merge(self, results: list[dict]) -> None:
        """Combine the results of several processes that each checked a share of the windows."""
        failed = [r for r in results if not r["ok"]]
        first = min(failed, key=lambda r: r["block"]) if failed else None
        self.result = {**self.result, "ok": first is None, "windows": sum(r["windows"] for r in results),
                       "max_abs": max(r["max_abs"] for r in results),
                       "block": first and first["block"], "module": first and first["module"]}


def check_dtype(model: torch.nn.Module, windows: torch.Tensor, device: str | torch.device | None = None,
                dtype: torch.dtype = torch.float16, batch_size: int = CHECK_WINDOWS) -> dict:
    """Run `model` in `dtype` block by block on token `windows` [n, seq_len], `batch_size` windows at a time.

    Returns {"ok", "dtype", "windows", "max_abs", "block", "module"}: max_abs is the largest finite
    |hidden state| between blocks; block and module are the first block (index) whose output is not finite
    and the first module (full name) inside it that produced a non-finite output (None when only the
    block's own arithmetic, such as a residual sum, overflowed). The check stops at that block: the blocks
    after it only see inf/NaN. The model is not changed; each block runs as a copy, on `device`.
    """
    stack = find_block_stack(model)
    if stack is None:
        raise ValueError("the dtype check runs the model block by block and needs a stack of repeated blocks")
    stack_name, blocks = stack
    device = torch.device(device) if device is not None else next(model.parameters()).device
    source = InMemorySource(model)
    check = DtypeCheck(dtype, windows)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with source.outside(stack_name, device):
                hidden, extras = capture_block_inputs(model, stack_name, blocks, list(windows.split(batch_size)),
                                                      device, len(blocks))
            for i in range(len(blocks)):
                with source.block(stack_name, i, device) as block:
                    check.step(f"{stack_name}.{i}", i, block, hidden, extras[i])
                if not check.result["ok"]:
                    break
    finally:
        model.train(was_training)
    return check.result


def describe(result: dict) -> str:
    """One sentence on a check_dtype result."""
    dtype, limit = result["dtype"], torch.finfo(getattr(torch, result["dtype"])).max
    scale = f"largest finite |hidden state| {result['max_abs']:.4g}, {dtype}'s limit {limit:.6g}"
    if result["ok"]:
        return f"every block's output stays finite in {dtype} on {result['windows']} window(s) ({scale})"
    where = (f"first in {result['module']}" if result["module"] else
             "in the block's own arithmetic (such as a residual sum), not in a submodule")
    return f"block {result['block']} is the first whose output is not finite in {dtype}: {where} ({scale})"
