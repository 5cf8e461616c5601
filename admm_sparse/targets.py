"""What a prunable layer is: one [out, in] weight matrix, written back in place, and the inputs that reach it.

Three kinds share one interface (Target), so the block loop never asks which it has:
- an nn.Linear (its weight as it is; its inputs are what its forward receives);
- GPT-2's Conv1D, a Linear stored transposed ([in, out]): pruned as the Linear of the transposed weight;
- one expert's matrix inside a fused 3D expert parameter (transformers 5 MoE blocks keep all experts in
  `gate_up_proj` [experts, 2·I, H] and `down_proj` [experts, H, I], or transposed): `gate_proj`, `up_proj`
  and `down_proj` of expert e are slices of those; their inputs are exactly the tokens the router sent to e.
  The fused gate_up is split along its rows (gate = the first I rows, up = the last I; interleaved layouts
  take every other row), so gate and up are separate layers for selection and statistics.

A Target's `weight` is a view into the model's parameter: whatever a pruner writes into `weight.data`
lands in the model. `view_of` gives the same region of any tensor shaped like that parameter, which is how
the exports find, after transformers re-splits fused tensors into the checkpoint's layout, which stored
tensors hold pruned weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are the same values in memory: hooks pass inputs .detach()ed, a new tensor object over
    the same storage. (The caller keeps `a` alive, so its memory cannot be reused by `b`.)"""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype and a.device == b.device)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's transformers.pytorch_utils.Conv1D (matched by name: no transformers import needed)."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module: 3D expert parameters described by @use_experts_implementation."""
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate") and isinstance(
        getattr(module, "down_proj", None), nn.Parameter) and module.down_proj.dim() == 3


@dataclass(eq=False)
class Target:
    """One prunable [out, in] weight. kind: "linear", "conv1d" or "expert"."""

    name: str  # the name patterns and reports use, e.g. model.layers.0.mlp.experts.3.gate_proj
    kind: str
    module: nn.Module  # the module whose forward sees its inputs (the experts module for an expert)
    param_name: str  # full state_dict name of the parameter holding the weight
    view_of: Callable[[torch.Tensor], torch.Tensor]  # param-shaped tensor -> this target's [out, in] region
    bias_name: str | None = None  # full name of the bias it owns (marked W16A16S with it), if any
    bias_view_of: Callable[[torch.Tensor], torch.Tensor] | None = None
    expert: int | None = None
    role: str | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The [out, in] weight, a view into the model's parameter (writes go to the model)."""
        return self.view_of(self.parameter.data)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def parameter(self) -> nn.Parameter:
        """The whole parameter the weight lives in (shared by several targets for experts)."""
        return getattr(self.module, self.param_name.rpartition(".")[2])


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.T


def _expert_rows(e: int, rows: slice, transposed: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Expert e's [out, in] matrix inside a 3D parameter ([E, out, in], or [E, in, out] when transposed),
    restricted to `rows` of out."""
    if transposed:
        return lambda t: t[e].T[rows]
    return lambda t: t[e, rows]


def _expert_bias(e: int, rows: slice) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t[e, rows]


def expert_targets(prefix: str, experts: nn.Module) -> list[Target]:
    """gate_proj / up_proj / down_proj of every expert of a fused experts module named `prefix`."""
    transposed = bool(experts.is_transposed)
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    width = getattr(experts, first).shape[2 if transposed else 1]  # 2I (gated) or I
    if experts.has_gate:
        half = width // 2
        if getattr(experts, "is_concatenated", True):
            parts = [("gate_proj", slice(0, half)), ("up_proj", slice(half, width))]
        else:  # interleaved [gate0, up0, gate1, up1, ...]
            parts = [("gate_proj", slice(0, width, 2)), ("up_proj", slice(1, width, 2))]
    else:
        parts = [("up_proj", slice(0, width))]
    parts.append(("down_proj", slice(None)))
    has_bias = bool(getattr(experts, "has_bias", False))
    out = []
    for e in range(getattr(experts, first).shape[0]):
        for role, rows in parts:
            attr = "down_proj" if role == "down_proj" else first
            out.append(Target(
                name=f"{prefix}.{e}.{role}", kind="expert", module=experts, param_name=f"{prefix}.{attr}",
                view_of=_expert_rows(e, rows, transposed),
                bias_name=f"{prefix}.{attr}_bias" if has_bias else None,
                bias_view_of=_expert_bias(e, rows) if has_bias else None, expert=e, role=role))
    return out


def find_targets(modules: Iterable[tuple[str, nn.Module]]) -> list[Target]:
    """Every prunable weight among (full name, module) pairs, in module order."""
    out = []
    for name, module in modules:
        if isinstance(module, nn.Linear):
            out.append(Target(name, "linear", module, f"{name}.weight", _whole,
                              f"{name}.bias" if module.bias is not None else None, _whole if module.bias is not None else None))
        elif is_conv1d(module):
            out.append(Target(name, "conv1d", module, f"{name}.weight", _transposed,
                              f"{name}.bias" if module.bias is not None else None, _whole if module.bias is not None else None))
        elif is_fused_experts(module):
            out += expert_targets(name, module)
    return out


ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def routers(modules: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """Names of MoE routers (the modules scoring the experts, and Qwen2-MoE's gate of its shared expert):
    never pruned, since a pruned router changes which experts run and how much each counts. A router is a
    child named as in ROUTER_NAMES of a module that also has `experts`."""
    names = []
    for name, module in modules:
        if not hasattr(module, "experts"):
            continue
        for attr in ROUTER_NAMES:
            child = getattr(module, attr, None)
            if isinstance(child, nn.Module) and not hasattr(child, "experts"):
                names.append(f"{name}.{attr}" if name else attr)
    return names


# ---------------------------------------------------------------- inputs

def _expert_inputs(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor):
    """(expert, routed inputs of gate/up, inputs of down) for every expert that received tokens, computed
    as transformers' experts forward computes them (same weights, bias, gating)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    top_k_index = top_k_index.reshape(hidden.shape[0], -1)
    first = experts.gate_up_proj if experts.has_gate else experts.up_proj
    for e in range(first.shape[0]):
        token_idx = (top_k_index == e).any(-1).nonzero().squeeze(1)
        if token_idx.numel() == 0:
            continue
        x = hidden[token_idx]
        yield e, x, expert_down_input(experts, e, x)


def expert_down_input(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """The input of expert e's down projection for inputs x of its gate/up."""
    first = experts.gate_up_proj if experts.has_gate else experts.up_proj
    w = first[e].T if experts.is_transposed else first[e]
    bias_name = "gate_up_proj_bias" if experts.has_gate else "up_proj_bias"
    bias = getattr(experts, bias_name)[e] if getattr(experts, "has_bias", False) else None
    proj = F.linear(x, w, bias)
    return experts._apply_gate(proj) if experts.has_gate else experts.act_fn(proj)


Sink = Callable[[Target, torch.Tensor], None]


def _linear_hook(target: Target, sink: Sink):
    def hook(module, args, kwargs, output):
        sink(target, (args[0] if args else kwargs["input"]).detach())
    return hook


def _experts_hook(targets: list[Target], sink: Sink):
    by_expert: dict[int, list[Target]] = {}
    for t in targets:
        by_expert.setdefault(t.expert, []).append(t)

    def hook(module, args, kwargs, output):
        names = ("hidden_states", "top_k_index")
        values = list(args[:2]) + [kwargs[n] for n in names[len(args[:2]):]]
        for e, x, down_in in _expert_inputs(module, values[0].detach(), values[1]):
            for t in by_expert.get(e, ()):
                sink(t, down_in if t.role == "down_proj" else x)  # gate and up: the same tensor
    return hook


def _all_tokens_hook(targets: list[Target], sink: Sink):
    def hook(module, args, kwargs, output):
        hidden = (args[0] if args else kwargs["hidden_states"]).detach()
        x = hidden.reshape(-1, hidden.shape[-1])
        for t in targets:
            sink(t, expert_down_input(module, t.expert, x) if t.role == "down_proj" else x)
    return hook


class feeding:
    """Context manager: while active, every forward of the targets' modules calls sink(target, inputs).
    all_tokens: experts get every token that reaches their MoE block, not only those routed to them."""

    def __init__(self, targets: Iterable[Target], sink: Sink, all_tokens: bool = False):
        self.targets, self.sink, self.all_tokens, self.handles = list(targets), sink, all_tokens, []

    def __enter__(self):
        experts: dict[int, list[Target]] = {}
        for t in self.targets:
            if t.kind == "expert":
                experts.setdefault(id(t.module), []).append(t)
            else:
                self.handles.append(t.module.register_forward_hook(_linear_hook(t, self.sink), with_kwargs=True))
        make_hook = _all_tokens_hook if self.all_tokens else _experts_hook
        for group in experts.values():
            self.handles.append(group[0].module.register_forward_hook(make_hook(group, self.sink), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return False
