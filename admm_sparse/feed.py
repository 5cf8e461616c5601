"""A block's selected layers fed their calibration inputs and pruned: hooks route each input to its layer's pruner
(layers reading one tensor share its statistics), groups in data-flow order for sequential pruning, priors for
experts few tokens reach, and the work spread over the processes of a Group."""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import FloatSparseConfig
from .distributed import Group, layer_cost, split_layers, sum_statistics
from .layer import all_finite
from .stream import calibration_autocast
from .targets import Target, feeding, same_tensor

# make_pruner(name, target) -> object with add_batch(inp), fasterprune(sparse_ratio) -> report, free(); the
# target's .weight is the layer's [out, in] weight (a view into the model: write the result into .data).
# The report needs at least sparsity, relative_error and seconds (a dataclass, an object or a dict).
PrunerFactory = Callable[[str, Target], Any]


def _report_dict(report) -> dict:
    if isinstance(report, dict):
        return dict(report)
    if hasattr(report, "to_dict"):
        return report.to_dict()
    return {k: v for k, v in vars(report).items() if not k.startswith("_")}


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
        leader = next((owner for seen, owner in self.batch if same_tensor(seen, inp)), None) if self.sharing else None
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


def prune_targets(targets: list[Target], run: Callable[[], Any], batch_start: nn.Module, make_pruner: PrunerFactory,
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


def prune_block(block: nn.Module, targets: list[Target], hidden, extras, config: FloatSparseConfig, device,
                 make_pruner: PrunerFactory, ratios: dict[str, float], progress: bool, desc: str, group: Group,
                 scalers: dict | None, dense_layer_inputs: dict | None = None) -> list[dict]:
    """Prune a block's selected layers on its calibration inputs: all from one pass, or with config.sequential
    group by group in data-flow order (data_flow_groups), each group's statistics from a pass with the groups
    before it already pruned, the pass stopped once the group's layers have run. dense_layer_inputs: for dense
    targets (config.dense_targets), {id(layer module): the dense model's input to it, per batch} (from
    stream.run_dense_block); each group's entries are dropped once the group is pruned."""
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
        rows += prune_targets(part, feed, block, make_pruner, ratios, progress, desc, group, scalers,
                              dense_inputs, config.dense_targets)
        if dense_layer_inputs is not None:
            for key in fitted:
                dense_layer_inputs.pop(key)
    order = {t.name: i for i, t in enumerate(targets)}
    return sorted(rows, key=lambda row: order[row["name"]])


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
        same = next((g for seen, g in groups if same_tensor(seen, x)), None)
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
