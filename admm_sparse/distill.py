"""Distillation: once the block loop has pruned every block, the kept weights of all pruned layers fitted jointly,
masks fixed, so that the pruned model's next-token distributions match the dense model's on the calibration
windows. Block reconstruction fits each block to the dense block's output alone; this fit sees what no block-local
one can: how the later blocks and the head read a block's error.

- loss: the mean over the predicted tokens of KL(dense || pruned) = sum_v p(v) (log p(v) - log q(v)), p the dense
  model's next-token distribution, q the pruned model's. The dense distributions come from the dense model's final
  hidden states, which the loop's dense stream carries to the end of the stack (the model's own head run on them:
  stream.head_logits), so no dense copy of the model is kept;
- more text (distill_samples): windows sampled from the dense model before the loop prunes it, each continuing the
  start of a fitted calibration window (sample_windows), fitted beside the calibration windows on the dense final
  hidden states a stream of the loop's carries through the dense blocks: 56 windows of 512 tokens are few for a fit
  of every kept weight, and the dense model's own text carries its distributions without more data than the
  calibration windows;
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

PROMPT_TOKENS = 16  # a sampled window continues this many tokens of a calibration window
SAMPLE_TOKENS = 32768  # tokens sampled at once (windows of 512: 64): one step's weights read for many windows
SAMPLING_SEED = 0


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


def _static_cache(model: nn.Module, length: int):
    """A key-value cache of `length` tokens written in place, where the model takes one (transformers' models that
    compile whole, which all take a StaticCache), else None (the model makes its own). The default dynamic cache
    concatenates every layer's keys and values at every step: sampling 64 windows of 512 tokens took 1.56x as long
    with it on a 2-core CPU (benchmarks/bench_sampling.py; RESULTS.md, "Sampling's cache")."""
    if not getattr(model, "_can_compile_fullgraph", False):
        return None
    from transformers import StaticCache
    return StaticCache(config=model.config, max_cache_len=length)


@torch.no_grad()
def sample_windows(model: nn.Module, batches: Sequence[torch.Tensor], count: int, device: torch.device,
                   sampling_context) -> tuple[list[torch.Tensor], float]:
    """`count` token windows sampled from the dense `model` for distillation.

    Each window continues the first PROMPT_TOKENS tokens of a fitted calibration window (cycled; never a held-out
    one, which judges the fit), token by token from the model's full next-token distribution (temperature 1; a CPU
    generator seeded SAMPLING_SEED: the same draws on any device, the same text where the logits agree), to the
    calibration windows' length; SAMPLE_TOKENS tokens' worth of windows at a time (their key-value cache, static
    where the model takes one, is the memory it takes), inside `sampling_context()` (the calibration passes'
    autocast). Returns the windows in batches of the calibration batches' size, and the seconds taken. Run before
    the model is pruned (the block loop's dense stream then carries them through the stack); the model goes back
    where it was."""
    start = time.perf_counter()
    fitted, _ = holdout_split(len(batches), "distillation")
    windows = torch.cat([batches[b] for b in fitted])
    length, batch_size = windows.shape[1], batches[0].shape[0]
    if length <= PROMPT_TOKENS:
        raise ValueError(f"sampling windows for distillation continues {PROMPT_TOKENS} tokens of a calibration "
                         f"window: the windows must be longer, got {length} tokens; set distill_samples to 0")
    prompts = windows[torch.arange(count) % len(windows), :PROMPT_TOKENS]
    # the key-value cache's keyword: `cache` in recent transformers, `past_key_values` before; none: no cache
    parameters = inspect.signature(model.forward).parameters
    cache_keyword = next((k for k in ("cache", "past_key_values") if k in parameters), None)
    generator = torch.Generator().manual_seed(SAMPLING_SEED)
    home = next(model.parameters()).device
    model.to(device)
    try:
        sampled = []
        for chunk in prompts.split(max(1, SAMPLE_TOKENS // length)):
            tokens, feed, cache = chunk, chunk.to(device), _static_cache(model, length) if cache_keyword else None
            with sampling_context():
                while tokens.shape[1] < length:
                    if cache_keyword is None:
                        out = model(input_ids=feed, use_cache=False)
                    else:
                        out = model(input_ids=feed, use_cache=True, **{cache_keyword: cache})
                        cache = getattr(out, cache_keyword, None)
                    probs = torch.softmax(out.logits[:, -1].float(), dim=-1).cpu()
                    nxt = torch.multinomial(probs, 1, generator=generator)
                    tokens = torch.cat([tokens, nxt], dim=1)
                    feed = nxt.to(device) if cache is not None else tokens.to(device)  # no cache: the whole prefix
            sampled.append(tokens)
    finally:
        model.to(home)
    return list(torch.cat(sampled).split(batch_size)), time.perf_counter() - start


def distill(model: nn.Module, stack_name: str, blocks: nn.ModuleList, targets: Sequence[Target],
            batches: Sequence[torch.Tensor], dense_finals: Sequence[torch.Tensor], device: torch.device, *,
            epochs: int, lr: float, rounding: dict, scalers: dict, schedule: str = "constant", bfloat16: bool = False,
            sampled: Sequence[torch.Tensor] = (), sampled_finals: Sequence[torch.Tensor] = ()) -> dict:
    """Fit the pruned `targets` of `model` (weights in place, masks fixed) so that its next-token distributions on
    the calibration token `batches` approach the dense model's, whose final hidden states (the stack's output) on
    each batch are `dense_finals`; see the module's docstring. `sampled`, `sampled_finals`: windows sampled from the
    dense model (sample_windows) and its final hidden states on them, fitted beside the calibration batches (never
    held out). The model runs on `device` and goes back where it was. rounding, scalers: as for
    reconstruct.reconstruct_block. schedule: the step size over the fit, "constant" or "cosine" (fit.fit).
    bfloat16: the fit's forwards and backwards in bfloat16 autocast (the held-out error that picks the kept epoch in
    the model's dtype).
    Returns the report: the held-out mean KL before and after, the batch counts, epochs run, the epoch kept (0: the
    model as the loop left it), seconds."""
    start = time.perf_counter()
    fitted, held = holdout_split(len(batches), "distillation")
    fitted_pairs = [(batches[b], dense_finals[b]) for b in fitted] + list(zip(sampled, sampled_finals))
    home = next(model.parameters()).device
    model.to(device)
    try:
        def dense(batch: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return head_logits(model, stack_name, blocks, batch, final)

        def loss(i: int) -> torch.Tensor:
            batch, final = fitted_pairs[i]
            batch = batch.to(device)
            teacher = dense(batch, final)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bfloat16):
                student = _logits(model, batch)
            return kl_to_dense(student, teacher)

        def heldout_kl(b: int) -> float:
            batch = batches[b].to(device)
            with torch.no_grad():
                return kl_to_dense(_logits(model, batch), dense(batch, dense_finals[b])).item()

        def heldout_error() -> float:
            return sum(heldout_kl(b) for b in held) / len(held)

        report = fit(model, Weights(targets, lr, rounding, scalers), len(fitted_pairs), loss, heldout_error,
                     epochs=epochs, schedule=schedule)
    finally:
        model.to(home)
    return {"fit_batches": len(fitted), "sampled_batches": len(sampled), "heldout_batches": len(held), **report,
            "seconds": time.perf_counter() - start}
