"""Distillation: once the block loop has pruned every block, the kept weights of all pruned layers fitted jointly,
masks fixed, so that the pruned model's next-token distributions match the dense model's on the calibration
windows. Block reconstruction fits each block to the dense block's output alone; this fit sees what no block-local
one can: how the later blocks and the head read a block's error.

- loss: the mean over the predicted tokens of KL(dense || pruned) = sum_v p(v) (log p(v) - log q(v)), p the dense
  model's next-token distribution, q the pruned model's. The dense distributions come from the dense model's final
  hidden states, which the loop's dense stream carries to the end of the stack (the model's own head run on them:
  stream.head_logits), so no dense copy of the model is kept;
- the fit is admm_sparse.fit's (shared with block reconstruction): Adam on float32 masters of the pruned layers'
  kept weights, masks fixed (every zero stays exactly zero), each layer's step size `lr` times its kept weights'
  RMS, every 8th calibration batch held out (its mean KL picks the kept epoch and stops the fit; epoch 0 is the
  model as the loop left it, so the result is never worse on the held-out batches), keep-bit rounding re-applied
  straight-through after every step. Biases, norms, embeddings, the head and unpruned layers stay as they are;
- the whole model is on the compute device for the fit, with, for every weight of a pruned layer (its zeros
  included: the tensors are dense), Adam's two float32 moments, the gradients and a float32 master where the layer
  is not float32 (about 16 bytes beside the model), and one batch's activations for the backward pass: the model
  must be in memory (not streamed), and the fit runs in one process.
"""
from __future__ import annotations

import inspect
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .fit import Weights, fit, holdout_split
from .stream import head_logits
from .targets import Target


def kl_to_dense(logits: torch.Tensor, dense_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens of KL(dense || pruned) from the two models' logits [..., vocab], in float32."""
    log_p = F.log_softmax(dense_logits.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def _not_a_language_model(model: nn.Module, what: str) -> ValueError:
    return ValueError(f"distillation fits the model's next-token distributions: {type(model).__name__} {what}, "
                      "not a causal language model's (input_ids in, logits out); set distill_epochs to 0")


def check_model(model: nn.Module) -> None:
    """Refuse, before any work, a model whose forward does not take input_ids (not a language model)."""
    if "input_ids" not in inspect.signature(model.forward).parameters:
        raise _not_a_language_model(model, "has a forward without input_ids")


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=batch, use_cache=False)
    if not hasattr(out, "logits"):
        raise _not_a_language_model(model, f"returns {type(out).__name__}")
    return out.logits


def distill(model: nn.Module, stack_name: str, blocks: nn.ModuleList, targets: Sequence[Target],
            batches: Sequence[torch.Tensor], dense_finals: Sequence[torch.Tensor], device: torch.device, *,
            epochs: int, lr: float, rounding: dict, scalers: dict, bfloat16: bool = False) -> dict:
    """Fit the pruned `targets` of `model` (weights in place, masks fixed) so that its next-token distributions on
    the calibration token `batches` approach the dense model's, whose final hidden states (the stack's output) on
    each batch are `dense_finals`; see the module's docstring. The model runs on `device` and goes back where it
    was. rounding, scalers: as for reconstruct.reconstruct_block. bfloat16: the fit's forwards and backwards in
    bfloat16 autocast (the held-out error that picks the kept epoch in the model's dtype).
    Returns the report: the held-out mean KL before and after, the batch counts, epochs run, the epoch kept (0: the
    model as the loop left it), seconds."""
    start = time.perf_counter()
    fitted, held = holdout_split(len(batches), "distillation")
    home = next(model.parameters()).device
    model.to(device)
    try:
        def dense(b: int) -> torch.Tensor:
            with torch.no_grad():
                return head_logits(model, stack_name, blocks, batches[b].to(device), dense_finals[b])

        def loss(b: int) -> torch.Tensor:
            b = fitted[b]
            teacher = dense(b)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bfloat16):
                student = _logits(model, batches[b].to(device))
            return kl_to_dense(student, teacher)

        def heldout_error() -> float:
            with torch.no_grad():
                values = [kl_to_dense(_logits(model, batches[b].to(device)), dense(b)).item() for b in held]
            return sum(values) / len(values)

        report = fit(model, Weights(targets, lr, rounding, scalers), len(fitted), loss, heldout_error, epochs=epochs)
    finally:
        model.to(home)
    return {"fit_batches": len(fitted), "heldout_batches": len(held), **report,
            "seconds": time.perf_counter() - start}
