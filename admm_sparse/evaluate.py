"""Perplexity on non-overlapping windows of a token stream (the BENCHMARKS.md evaluation)."""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def eval_windows(ids: torch.Tensor, seq_len: int, num_windows: int | None = 100) -> torch.Tensor:
    """The first `num_windows` non-overlapping windows [n, seq_len] of a token stream (None or more than it
    has: all of them, the latter with a warning)."""
    ids = ids.reshape(-1)
    available = ids.numel() // seq_len
    if available == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
                         "give a longer text or a smaller --seq-len")
    n = available if num_windows is None else min(num_windows, available)
    if num_windows is not None and num_windows > available:
        warnings.warn(f"the evaluation text has only {available} windows of {seq_len} tokens; using all of them "
                      f"instead of {num_windows}", stacklevel=3)
    return ids[: n * seq_len].reshape(n, seq_len)


def nll_sum(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
    """(summed next-token negative log-likelihood, predictions) of token windows `batch` under `logits`."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
    return nll, batch[:, 1:].numel()


def perplexity(model, ids: torch.Tensor, seq_len: int = 512, num_windows: int | None = 100,
               device: str | torch.device | None = None, batch_size: int = 4, progress: bool = True) -> float:
    """exp(mean next-token NLL) over the first `num_windows` non-overlapping windows of `ids`.

    Each window is evaluated on its own (no context carried over), so each contributes seq_len - 1
    predictions. num_windows=None uses every full window. The model runs on `device` (default: where it is)
    and goes back where it was.
    """
    windows = eval_windows(ids, seq_len, num_windows)
    n = windows.shape[0]

    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval().to(device)
    nll, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress,
                              leave=False):
                batch = windows[start: start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                batch_nll, predictions = nll_sum(logits, batch)
                nll, count = nll + batch_nll, count + predictions
    finally:
        model.to(home).train(was_training)
    return math.exp(nll / count)
