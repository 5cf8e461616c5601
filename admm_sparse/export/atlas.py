"""The Atlas 300I Duo W16A16S folder (SPEC §5).

- quant_model_weights.safetensors (or its numbered shards and index, export.shards): every tensor in float16
  (tied tensors stored under each name), under the names and in the layout of the model's checkpoint (fused
  MoE experts stored per expert, as save_pretrained writes them and the Atlas toolchain reads them);
- quant_model_description.json: "W16A16S" for the weight and bias of each pruned layer, "FLOAT" for the rest;
- config.json with torch_dtype float16 (the card has no bfloat16), generation_config.json, tokenizer files.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from . import drop_gguf_quantization

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


def load_atlas(folder: str | Path, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """The model of an Atlas folder, loaded by transformers' own from_pretrained (so checkpoint names, fused
    experts and shards are read exactly as for a Hugging Face folder): from_pretrained reads a temporary
    folder whose config.json and weight files are links to the Atlas folder's."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder).absolute()
    index = folder / f"{WEIGHTS_FILE.removesuffix('.safetensors')}.safetensors.index.json"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "config.json").symlink_to(folder / "config.json")
        if index.is_file():
            (tmp / "model.safetensors.index.json").symlink_to(index)
            for shard in set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()):
                (tmp / shard).symlink_to(folder / shard)
        else:
            (tmp / "model.safetensors").symlink_to(folder / WEIGHTS_FILE)
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
