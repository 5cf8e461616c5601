"""A plain Hugging Face folder: dense safetensors with the zeros in place, loadable with from_pretrained."""
from __future__ import annotations

from pathlib import Path

from . import drop_gguf_quantization


def write_hf(model, folder: str | Path, tokenizer=None) -> None:
    """save_pretrained into an existing (empty) folder, in the model's own dtype; see export.export_model."""
    drop_gguf_quantization(model)  # a dequantised GGUF model is a plain float model; save it as one
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
