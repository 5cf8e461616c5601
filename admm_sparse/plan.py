"""Which layers a config prunes in a model: the stack of decoder blocks, the selected layers inside it, and what is
left alone on purpose (MoE routers, shared weights, layers an N:M mask does not fit, parameters of unknown layout)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from .config import FloatSparseConfig
from .layer import parse_mask_structure
from .select import select_targets
from .targets import Target, find_targets, is_conv1d, is_fused_experts, routers


def _has_targets(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) or is_conv1d(m) or is_fused_experts(m) for m in module.modules())


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Candidate block stacks: every nn.ModuleList of modules holding prunable layers that is not inside
    another such list (so an MoE block's list of experts is not a stack), in model order."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(isinstance(b, nn.Linear) or is_conv1d(b) for b in module) or not all(_has_targets(b) for b in module):
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        found.append((name, module))
    return found


def _decoder_prefix(model: nn.Module) -> str | None:
    """Full name of the module that model.get_decoder() returns (the language model's decoder in multimodal
    wrappers), or None when the model has no such method or it returns the model itself."""
    get = getattr(model, "get_decoder", None)
    try:
        decoder = get() if callable(get) else None
    except Exception:  # noqa: BLE001 - models implement it loosely; without it we fall back to size
        return None
    if decoder is None or decoder is model:
        return None
    return next((name for name, m in model.named_modules() if m is decoder), None)


def find_block_stack(model: nn.Module, name: str | None = None) -> tuple[str, nn.ModuleList] | None:
    """(full name, ModuleList) of the model's stack of decoder blocks, or None.

    name: the stack's full name, given by the user (--blocks). Otherwise the candidate inside the language
    model's decoder (get_decoder()) when there is one, else the largest candidate by parameters: a vision
    tower beside the language model is never picked over it. Blocks may be of several kinds (dense and MoE,
    sliding-window and global attention).
    """
    stacks = block_stacks(model)
    if name is not None:
        match = [s for s in stacks if s[0] == name]
        if not match:
            listed = ", ".join(repr(n) for n, _ in stacks) or "none"
            raise ValueError(f"--blocks {name!r} is not a stack of blocks with prunable layers in this model; "
                             f"the candidates are: {listed}")
        return match[0]
    decoder = _decoder_prefix(model)
    if decoder is not None:
        inside = [s for s in stacks if decoder == "" or s[0].startswith(f"{decoder}.")]
        stacks = inside or stacks
    if not stacks:
        return None
    return max(stacks, key=lambda s: sum(p.numel() for p in s[1].parameters()))


def candidate_modules(model: nn.Module, stack: tuple[str, nn.ModuleList] | None = None) -> list[tuple[str, nn.Module]]:
    """Modules that may be pruned: those inside the block stack; without one, all but the output embedding."""
    # Every name of a module used in several places (so that a weight shared by two blocks is seen as tied).
    modules = list(model.named_modules(remove_duplicate=False))
    if stack is not None:
        prefix = stack[0] + "."
        return [(n, m) for n, m in modules if n.startswith(prefix)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in modules if m is not head]


@dataclass
class Plan:
    """What a config prunes in a model, and what it leaves alone on purpose."""

    stack: tuple[str, nn.ModuleList] | None
    targets: dict[str, Target]  # selected, by name, in model order
    routers: list[str]  # MoE routers: never pruned
    tied: dict[str, str]  # layer -> why it is left as it is (its weight is shared)
    unknown: list[str]  # parameters of 3 or more dimensions in a layout no Target kind reads: left dense


def make_plan(model: nn.Module, config: FloatSparseConfig, blocks: str | None = None) -> Plan:
    """Select the prunable layers (admm_sparse.targets) the config names, inside the block stack.

    Left out: MoE routers (a pruned router changes which experts run; they are not nn.Linear in most
    transformers 5 models anyway, and are excluded where they are); a layer whose weight is shared with a
    module that is not selected (pruning it would change that module too); a weight shared by several
    selected layers is pruned once, at its first use. An "N:M" mask_structure leaves out, with a warning,
    layers whose in_features M does not divide."""
    stack = find_block_stack(model, blocks)
    modules = candidate_modules(model, stack)
    router_names = routers(modules)
    targets = [t for t in find_targets(modules) if not any(t.name == r or t.name.startswith(f"{r}.")
                                                          for r in router_names)]
    selected = select_targets(targets, config.include, config.exclude)
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    selected_params = {t.param_name for t in selected.values()}
    tied, claimed = {}, {}
    for name, target in list(selected.items()):
        names = owners.get(id(target.parameter), [target.param_name])
        if len(names) == 1:
            continue
        outside = [n for n in names if n not in selected_params]
        first = claimed.setdefault(id(target.parameter), name)
        if outside:
            tied[name] = f"its weight is shared with {outside[0]}, which is not pruned"
        elif first != name:
            tied[name] = f"its weight is {first}'s (tied), pruned there once"
        if name in tied:
            del selected[name]
    if tied:
        warnings.warn("left as they are, their weights being shared: "
                      + "; ".join(f"{n}: {why}" for n, why in tied.items()), stacklevel=2)
    kind, _, m = parse_mask_structure(config.mask_structure)
    misfits = [name for name, t in selected.items() if kind == "N:M" and t.shape[1] % m]
    if misfits:
        warnings.warn(f"mask_structure {config.mask_structure!r} needs in_features divisible by {m}; left dense: "
                      f"{misfits}", stacklevel=2)
    selected = {name: t for name, t in selected.items() if name not in misfits}
    known = {t.param_name for t in targets}
    unknown = [f"{name}.{p}" if name else p for name, m in modules for p, param in m.named_parameters(recurse=False)
               if param.dim() >= 3 and f"{name}.{p}" not in known]
    if unknown:
        warnings.warn(f"parameters in a layout admm_sparse does not know are left dense: {unknown}", stacklevel=2)
    return Plan(stack, selected, router_names, tied, unknown)
