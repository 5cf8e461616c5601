"""What block reconstruction (admm_sparse.reconstruct) and distillation (admm_sparse.distill) share: the pruned
layers' kept weights fitted with Adam, masks fixed, on the calibration batches, with every 8th batch held out to
pick the best epoch and stop the fit.

- the weights (Weights): float32 masters and float32 Adam moments; the gradient of every pruned entry is masked, so
  it stays exactly zero; each layer's step size is `lr` times the RMS of its kept weights, so that one learning
  rate suits every layer and model scale (Adam's step is otherwise in the weights' own units); with keep-bit
  rounding the masters are rounded into the model after every step (straight-through: the forwards see the
  weights as delivered, the gradients move the unrounded masters);
- the epochs (fit): the fitted batches in a seeded random order each epoch, the step size constant or decayed to 0
  over the fit (cosine, a half cosine per step); after each epoch the held-out error is measured, the best weights
  so far are kept, and the fit stops after PATIENCE epochs without improvement or after `epochs`. Epoch 0 is the
  model as pruned, so the result is never worse on the held-out batches than no fit (the held-out batches did take
  part in the pruning's statistics, like every calibration batch).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from .keepbits import apply_keepbits
from .layer import all_finite
from .targets import Target

HOLDOUT_EVERY = 8  # every 8th calibration batch is held out of the fit
PATIENCE = 2  # epochs without a better held-out error before the fit stops


def holdout_split(count: int, fit: str = "block reconstruction") -> tuple[list[int], list[int]]:
    """(fitted, held-out) batch indices: every HOLDOUT_EVERY-th batch is held out, the last one if none is."""
    if count < 2:
        raise ValueError(f"{fit} holds calibration batches out of the fit to stop it early: it needs "
                         f"at least 2 calibration batches, got {count}; give more --num-samples or a smaller "
                         "--batch-size")
    held = [i for i in range(count) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1] or [count - 1]
    return [i for i in range(count) if i not in held], held



class Weights:
    """The pruned layers' weights being fitted: float32 masters, their masks of kept entries, the step sizes.
    A float32 layer without rounding is its own master (Adam updates the model's weight in place, no copy)."""

    def __init__(self, targets: Sequence[Target], lr: float, rounding: dict, scalers: dict):
        self.targets = list(targets)
        self.shared = [t.weight.dtype == torch.float32 and t.weight.is_contiguous() and rounding[t.name] is None
                       for t in self.targets]
        self.masters = [t.weight.detach() if shared else t.weight.detach().float().clone()
                        for t, shared in zip(self.targets, self.shared)]
        # float masks: multiplying by a bool mask promotes it to float on every step
        self.masks = [(m != 0).float() for m in self.masters]
        for master in self.masters:
            master.grad = torch.empty_like(master)  # filled by step(), kept across steps
        self.rounding, self.scalers = rounding, scalers
        groups = []
        for master, mask in zip(self.masters, self.masks):
            kept = master[mask.bool()]
            rms = kept.square().mean().sqrt().item() if kept.numel() else 0.0
            groups.append({"params": [master], "lr": lr * rms})
        # fused: one kernel per step over all tensors; the per-tensor loop's elementwise passes (sqrt, divide)
        # took about a quarter of the fit's time on CPU
        self.optimizer = torch.optim.Adam(groups, lr=lr, fused=True)

    def parameters(self) -> list[nn.Parameter]:
        """The model's parameters holding the weights (an expert's weight is a slice of a shared one), once each."""
        return list({id(t.parameter): t.parameter for t in self.targets}.values())

    def step(self) -> None:
        """One Adam step from the gradients of the model's parameters, masked; writes the result into the model.
        A pruned entry stays exactly zero: its gradient is always zero, so Adam's moments and step there are too."""
        with torch.no_grad():
            for t, master, mask in zip(self.targets, self.masters, self.masks):
                if t.parameter.grad is None:
                    master.grad.zero_()
                else:
                    torch.mul(t.view_of(t.parameter.grad), mask, out=master.grad)
        self.optimizer.step()
        self.write()

    def write(self) -> bool:
        """Write the masters into the model as they would be delivered: keep-bit rounded when rounding is on, so
        that the fit's forwards see the rounded weights and their gradients move the masters (straight-through).
        Returns False, writing the unrounded masters, when a weight has left float16's range (not deliverable)."""
        deliverable = True
        for t, master, shared in zip(self.targets, self.masters, self.shared):
            if shared:
                continue
            w = master.to(t.weight.dtype)
            if self.rounding[t.name] is not None:
                if all_finite(w.to(torch.float16)):
                    w = apply_keepbits(w, self.scalers[t.name], *self.rounding[t.name])
                else:
                    deliverable = False
            t.weight.copy_(w)
        return deliverable


def _finite_or_nan(value: float) -> float:
    return value if math.isfinite(value) else float("nan")


def fit(module: nn.Module, weights: Weights, batches: int, loss: Callable[[int], torch.Tensor],
        heldout_error: Callable[[], float], *, epochs: int, schedule: str = "constant") -> dict:
    """Fit `weights` (of `module`'s layers) for at most `epochs` epochs over fitted batches 0 .. batches - 1, where
    loss(b) is batch b's loss (a scalar to minimise, computed with gradients) and heldout_error() the error that
    picks the kept epoch (one that is not finite is reported as nan and never kept). Only the weights' parameters
    take gradients meanwhile. The model ends with the best epoch's weights. Returns {"heldout_before",
    "heldout_after", "epochs", "best_epoch", "heldout_by_epoch"} (the held-out error after each epoch run, nan where
    it was not finite or the weights not deliverable)."""
    before = _finite_or_nan(heldout_error())
    best, best_epoch = before, 0
    best_weights = [t.weight.detach().clone() for t in weights.targets]
    history = []
    steps = max(epochs * batches, 1)
    decay = torch.optim.lr_scheduler.LambdaLR(weights.optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))) \
        if schedule == "cosine" else None
    params = weights.parameters()
    wanted = {id(p) for p in params}
    requires = {p: p.requires_grad for p in module.parameters()}
    epoch = 0
    try:
        for p in module.parameters():
            p.requires_grad_(id(p) in wanted)
        for epoch in range(1, epochs + 1):
            order = torch.randperm(batches, generator=torch.Generator().manual_seed(epoch)).tolist()
            with torch.enable_grad():
                for b in order:
                    value = loss(b)
                    for p in params:
                        p.grad = None
                    value.backward()
                    weights.step()
                    if decay is not None:
                        decay.step()
            heldout = _finite_or_nan(heldout_error()) if weights.write() else float("nan")
            history.append(heldout)
            if heldout < best:  # a nan (diverged, or beyond float16 for the rounding) is never kept
                best, best_epoch = heldout, epoch
                best_weights = [t.weight.detach().clone() for t in weights.targets]
            elif epoch - best_epoch >= PATIENCE:
                break
    finally:
        for p, flag in requires.items():
            p.grad = None
            p.requires_grad_(flag)
        for t, w in zip(weights.targets, best_weights):
            t.weight.copy_(w)
    return {"heldout_before": before, "heldout_after": best, "epochs": epoch, "best_epoch": best_epoch,
            "heldout_by_epoch": history}
