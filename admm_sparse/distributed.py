"""Who does which part: a group of processes on torch.distributed, or one process alone.

The block loop (pipeline.prune_blocks) talks to a Group and never asks how many processes there are: a
single process is a group of one, whose collectives do nothing. Under `torchrun --nproc-per-node N`
(WORLD_SIZE > 1 in the environment) `from_environment` joins the process group PyTorch's launcher set up, with
the compute device's backend (device.backend: NCCL, HCCL, XCCL; Gloo on CPUs), one accelerator per rank from
LOCAL_RANK. Then:
- calibration (and evaluation) windows are split over the ranks, each rank capturing and running the blocks
  for its own windows only;
- per-layer statistics (the Hessian's lower triangle, the channels' sums of squares, token counts: all plain
  float64 sums) are summed over the ranks, one all-reduce per statistics group (q/k/v share one);
- the layers of a block are assigned to ranks, balanced by their cost (layer_cost: the inverse, the ADMM
  iterations' GEMMs and the passes over the weight), each rank pruning its own; a layer costing more than an
  even share of the block (split_layers) has its output rows split over all ranks instead (admm_sparse.split);
- each pruned weight is broadcast from its owner, then every rank runs the pruned block on its windows.
A collective that waits longer than the timeout fails, so a rank that died or hangs ends every rank with an
error; torchrun then names the failed rank and its cause (errors are recorded with its @record).
"""
from __future__ import annotations

import datetime
import os
from typing import Sequence

import torch

from . import device as devices

DEFAULT_TIMEOUT_S = 1800


class Group:
    """One process alone: rank 0 of 1; every collective leaves its tensor as it is."""

    rank, size = 0, 1

    def split(self, items: Sequence) -> list:
        """This rank's share of items (every size-th, starting at rank), so shares differ by at most one."""
        return list(items[self.rank::self.size])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the sum of every rank's tensor, on every rank."""
        return tensor

    def reduce(self, tensor: torch.Tensor, owner: int) -> None:
        """In place on `owner`: the sum of every rank's tensor (other ranks' tensors are left undefined)."""

    def broadcast(self, tensor: torch.Tensor, owner: int) -> None:
        """In place: every rank's tensor becomes owner's."""

    def gather_objects(self, value) -> list:
        """Every rank's picklable value, in rank order, on every rank."""
        return [value]

    def assign(self, costs: Sequence[float]) -> list[int]:
        """An owner rank for each item: largest first, each to the rank with the least work so far."""
        load = [0.0] * self.size
        owners = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
            owner = min(range(self.size), key=lambda r: (load[r], r))
            owners[i] = owner
            load[owner] += costs[i]
        return owners


class TorchGroup(Group):
    """The default process group of torch.distributed."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def sum(self, tensor):
        self.dist.all_reduce(tensor)
        return tensor

    def reduce(self, tensor, owner):
        self.dist.reduce(tensor, dst=owner)

    def broadcast(self, tensor, owner):
        self.dist.broadcast(tensor, src=owner)

    def gather_objects(self, value):
        out = [None] * self.size
        self.dist.all_gather_object(out, value)
        return out


def launched() -> bool:
    """Whether this process is one of several started by torchrun (or another launcher setting WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def from_environment(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Group, torch.device]:
    """(the group this process belongs to, its compute device). Without a launcher: Group() and `device`.
    Under torchrun: joins the process group with the device's backend (device.backend: NCCL for CUDA, HCCL for
    Ascend NPUs, XCCL for XPUs, Gloo for CPUs), one accelerator per process by LOCAL_RANK."""
    if not launched():
        return Group(), device
    import torch.distributed as dist

    device = devices.local_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(devices.backend(device), timeout=datetime.timedelta(seconds=timeout_s),
                                **devices.one_device_per_process(device))
    return TorchGroup(), device


def sum_statistics(group: Group, pruner) -> None:
    """Sum an AdmmPruner's statistics (its float64 sums: Hessian, squares, dense targets' cross product;
    sequence and token counts) over the ranks, on every rank, so that any rank can prune the layer (and the
    ranks sharing one Hessian, q/k/v, can split them). Each batch's float32 products are the same on any rank
    and float64 sums of them round to the same float32 statistics in any order (see README, "How close to one
    process"), so N processes prune the model of one."""
    if pruner.hessian_sum is None:
        raise RuntimeError("sum_statistics needs a pruner still accumulating: its statistics were already read")
    counts = torch.tensor([pruner.nsamples, pruner.tokens], dtype=torch.float64, device=pruner.hessian_sum.device)
    for total in (pruner.hessian_sum, pruner.square_sum, pruner.cross_sum):
        if total is not None:
            group.sum(total)
    nsamples, tokens = (int(c) for c in group.sum(counts).tolist())
    pruner.nsamples, pruner.tokens = nsamples, tokens


# A layer's ADMM time beyond its GEMMs, per weight: the 20 projection passes (select, dual, mask), keep-bit
# rounding, the error report. Fitted on the built-in model's layers on this project's 2-core CPU (q, k, o,
# gate, down: 0.18, 0.056, 0.17, 0.35, 0.75 s): the GEMM terms alone weigh down_proj 3.0x gate_proj, measured 2.1x.
ELEMENTWISE_COST = 8600.0


def split_layers(costs: Sequence[float], ranks: int) -> set[int]:
    """The layers (indices) whose output rows are split over all ranks (admm_sparse.split): those costing more
    than an even share of the block, which no assignment of whole layers can balance (a block waits for its most
    loaded rank). None with one rank."""
    share = sum(costs) / ranks
    return {i for i, cost in enumerate(costs) if ranks > 1 and cost > share}


def layer_cost(shape: tuple[int, int]) -> float:
    """A layer's ADMM cost for a weight [d_out, d_in], in multiply-adds: the d_in x d_in inverse, 20 GEMMs
    d_in x d_in x d_out, and ELEMENTWISE_COST per weight for the passes over it."""
    d_out, d_in = shape
    return float(d_in) ** 3 + 20.0 * d_in * d_in * d_out + ELEMENTWISE_COST * d_in * d_out
