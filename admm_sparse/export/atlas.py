"""The Atlas 300I Duo W16A16S folder (SPEC §5).

- quant_model_weights.safetensors: every tensor in float16 (tied tensors stored under each name), under the
  names and in the layout of the model's checkpoint (fused MoE experts stored per expert, as
  save_pretrained writes them and the Atlas toolchain reads them);
- quant_model_description.json: "W16A16S" for the weight and bias of each pruned layer, "FLOAT" for the rest;
- config.json with torch_dtype float16 (the card has no bfloat16), generation_config.json, tokenizer files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file

from . import checkpoint_state_dict, drop_gguf_quantization, sparse_tensor_names

WEIGHTS_FILE = "quant_model_weights.safetensors"
DESCRIPTION_FILE = "quant_model_description.json"
QUANT_TYPE = "W16A16S"


def to_float16(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in float16 on CPU; a finite value that float16 cannot hold is an error naming the tensor."""
    half = tensor.detach().to("cpu", torch.float16)
    overflow = torch.isinf(half) & torch.isfinite(tensor.detach().cpu())
    if overflow.any():
        worst = tensor.detach()[overflow.to(tensor.device)].abs().max().item()
        raise ValueError(f"tensor {name!r} has {int(overflow.sum())} value(s) beyond the float16 range "
                         f"(largest |x| = {worst:.4g} > 65504); the Atlas 300I Duo has no bfloat16, so this model "
                         "cannot be exported as W16A16S without rescaling that tensor")
    return half


def atlas_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor, floats in float16; each name gets its own storage (safetensors needs that)."""
    tensors, seen = {}, set()
    for name, tensor in checkpoint_state_dict(model).items():
        t = to_float16(name, tensor) if tensor.is_floating_point() else tensor.detach().cpu()
        t = t.contiguous()
        if t.data_ptr() in seen:  # tied weights (lm_head = embed_tokens) or an already-float16 shared tensor
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[name] = t
    return tensors


def atlas_description(names: Iterable[str], sparse: Iterable[str]) -> dict:
    """The quant_model_description.json content for tensor `names` when the tensors `sparse` are pruned."""
    names, sparse = list(names), set(sparse)
    unknown = sorted(sparse - set(names))
    if unknown:
        raise ValueError(f"sparse tensor(s) {unknown} are not among the model's tensors")
    desc = {"version": "1.0.0", "model_quant_type": QUANT_TYPE}
    desc.update({name: QUANT_TYPE if name in sparse else "FLOAT" for name in names})
    desc.update({"metadata": {}, "group_size": 0, "optional": {}})
    return desc


def write_config(model, folder: Path) -> None:
    """config.json (torch_dtype float16, no gguf entry) and generation_config.json, if the model has one."""
    drop_gguf_quantization(model)
    model.config.save_pretrained(folder)
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["torch_dtype"] = "float16"  # the key the Atlas toolchain reads
    if "dtype" in config:  # newer transformers write this name instead
        config["dtype"] = "float16"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)


def write_atlas(model: torch.nn.Module, folder: str | Path, pruned: Iterable[str], tokenizer=None) -> None:
    """Write the W16A16S files into an existing (empty) folder; see export.export_model for the atomic version."""
    folder = Path(folder)
    tensors = atlas_tensors(model)
    description = atlas_description(tensors, sparse_tensor_names(model, pruned))
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    write_config(model, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def load_atlas_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Load quant_model_weights.safetensors of an Atlas folder into a model built from its config.json."""
    tensors = load_file(str(Path(folder) / WEIGHTS_FILE))
    dtype = next(model.parameters()).dtype
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, strict=True)
