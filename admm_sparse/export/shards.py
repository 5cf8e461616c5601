"""Size-capped safetensors shards, written as blocks finish, with what is already on disk known for resume.

`ShardWriter(folder, fmt, shard_size)` buffers the tensors given to `add()` and writes a shard whenever the
next tensor would take the pending bytes past `shard_size` (a tensor larger than a shard gets a shard of
its own). While running, the folder holds:
- `<prefix>-00003.partial.safetensors`: the shard being written (save_file), renamed when complete to
- `<prefix>-00003.tmp.safetensors`: a completed shard, still without its final name (the count N is unknown);
- `.shard_writer.json`: the writer's state (format, shard size, the completed shards and their tensors),
  replaced atomically after each shard, so `ShardWriter.reopen(folder, ...)` after a killed run keeps the
  completed shards, drops partial files, and numbers on; `written()` is what need not be added again.

`finish()` gives the shards their final names and writes the index (then drops the state file):
- "hf", one shard: `model.safetensors`; N shards: `model-00001-of-0000N.safetensors` ... and
  `model.safetensors.index.json`;
- "atlas", one shard: `quant_model_weights.safetensors`; N shards: `quant_model_weights-00001-of-0000N.safetensors`
  ... and `quant_model_weights.safetensors.index.json`.

The index is `{"metadata": {"total_size": bytes}, "weight_map": {tensor name: file}}` in both formats. The
HF names are what `from_pretrained` reads; `hf_checkpoint_tensors` turns a block's state_dict tensors into
the names and tensors save_pretrained would write (tied copies dropped, fused experts split per expert).
The Atlas names are msModelSlim's: its AscendV1Saver, with `part_file_size` > 0, writes through
`BufferedSafetensorsWriter` with the prefix `quant_model_weights`, files
`quant_model_weights-00001-of-00002.safetensors` and `quant_model_weights.safetensors.index.json` with the
same index content (github.com/Ascend/msmodelslim: msmodelslim/core/quant_service/modelslim_v1/save/ascendv1.py
and save/utils/safetensors.py). Unlike msModelSlim (which writes `-00001-of-00001` when sharding is on, and
counts part_file_size in GiB), one shard keeps today's single-file layout and sizes follow parse_size. The Atlas
writer stores floating tensors in float16 (atlas.to_float16: a value beyond float16 is an error naming it).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atlas import WEIGHTS_FILE as ATLAS_WEIGHTS_FILE
from .atlas import to_float16

STATE_FILE = ".shard_writer.json"
# fmt -> (single-file name, shard prefix); the index is "<prefix>.safetensors.index.json"
LAYOUTS = {"hf": ("model.safetensors", "model"),
           "atlas": (ATLAS_WEIGHTS_FILE, ATLAS_WEIGHTS_FILE.removesuffix(".safetensors"))}
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kKmMgGtT]i?)?B)?\s*")


def parse_size(size: int | str) -> int:
    """Bytes in a shard size: an int, or "500MB", "5GB", "1.5GB" (powers of 1000, as transformers), "2GiB"
    (powers of 1024), "4096" or "4096B"."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.fullmatch(size) if isinstance(size, str) else None
        if match is None:
            raise ValueError(f"shard size {size!r} is not a size; write e.g. 5GB, 500MB, 2GiB, 1.5GB or a number "
                             "of bytes (units: B, KB, MB, GB, TB powers of 1000; KiB, MiB, GiB, TiB powers of 1024)")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"shard size {size!r} must be at least one byte")
    return value


def shard_names(fmt: str, count: int) -> list[str]:
    """The final file names of `count` shards in format `fmt` (one shard: the single-file name)."""
    single, prefix = LAYOUTS[fmt]
    if count == 1:
        return [single]
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def index_name(fmt: str) -> str:
    return f"{LAYOUTS[fmt][1]}.safetensors.index.json"


def hf_checkpoint_tensors(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What save_pretrained writes for some of `model`'s state_dict tensors (one block, or the rest): the
    tie's copies left out (lm_head.weight when tied to embed_tokens) and transformers' weight conversions
    reverted (a fused 3D `mlp.experts.gate_up_proj` back to per-expert gate_proj/up_proj weights)."""
    from transformers.core_model_loading import revert_weight_conversion

    tied_copies = set(getattr(model, "all_tied_weights_keys", None) or {})
    return revert_weight_conversion(model, {k: v for k, v in tensors.items() if k not in tied_copies})


class ShardWriter:
    """Appends finished tensors to size-capped safetensors shards in `folder` (see the module docstring).

    fmt: "hf" or "atlas". shard_size: bytes of tensor data per shard, an int or a string for parse_size.
    """

    def __init__(self, folder: str | Path, fmt: str, shard_size: int | str):
        folder = Path(folder)
        if (folder / STATE_FILE).exists():
            raise FileExistsError(f"{folder} holds the shards of an earlier run; continue it with "
                                  "ShardWriter.reopen, or write into an empty folder")
        folder.mkdir(parents=True, exist_ok=True)
        self._setup(folder, fmt, shard_size, [])
        self._save_state()  # from the start, so that a run killed before its first shard can be reopened

    @classmethod
    def reopen(cls, folder: str | Path, fmt: str, shard_size: int | str) -> ShardWriter:
        """The writer of an earlier, interrupted run in `folder`: its completed shards are kept, a shard it was
        writing is deleted, numbering continues. Tensors not in written() must be added again."""
        folder = Path(folder)
        if not (folder / STATE_FILE).is_file():
            raise FileNotFoundError(f"{folder} has no {STATE_FILE}: there is no interrupted run to continue there")
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        writer = cls.__new__(cls)
        writer._setup(folder, fmt, shard_size, state["shards"])
        if (state["format"], state["shard_size"]) != (writer.fmt, writer.shard_size):
            raise ValueError(f"{folder} was written as format {state['format']!r} with shards of "
                             f"{state['shard_size']} bytes; resume with the same format and shard size "
                             f"(not {fmt!r}, {writer.shard_size}), or start over")
        for shard, final in zip(writer._shards, shard_names(fmt, len(writer._shards))):
            if not (folder / shard["file"]).is_file() and (folder / final).is_file():
                os.replace(folder / final, folder / shard["file"])  # killed while finish() renamed
            if not (folder / shard["file"]).is_file():
                raise FileNotFoundError(f"{folder / shard['file']} is listed as written but is missing; "
                                        "the folder was changed since: start over")
        # A partial shard, or one completed after the last state update: its tensors are not in written().
        kept = {shard["file"] for shard in writer._shards}
        temporary = re.compile(rf"{re.escape(writer._prefix)}-\d+\.(partial|tmp)\.safetensors")
        for path in folder.iterdir():
            if temporary.fullmatch(path.name) and path.name not in kept:
                path.unlink()
        return writer

    def _setup(self, folder: Path, fmt: str, shard_size: int | str, shards: list[dict]) -> None:
        if fmt not in LAYOUTS:
            raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(LAYOUTS)}")
        self.folder, self.fmt, self.shard_size = folder, fmt, parse_size(shard_size)
        self._prefix = LAYOUTS[fmt][1]
        self._shards = shards  # completed: {"file": temporary name, "tensors": [names], "bytes": tensor bytes}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0

    def written(self) -> set[str]:
        """Names of the tensors safely on disk, in completed shards."""
        return {name for shard in self._shards for name in shard["tensors"]}

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Buffer tensors (copied to CPU; float16 for Atlas) and write every shard that fills up."""
        done = self.written()
        for name, tensor in tensors.items():
            if name in done or name in self._pending:
                raise ValueError(f"tensor {name!r} was already added to {self.folder}")
            tensor = self._prepare(name, tensor)
            size = tensor.numel() * tensor.element_size()
            if self._pending and self._pending_bytes + size > self.shard_size:
                self._flush()
            self._pending[name] = tensor
            self._pending_bytes += size

    def finish(self) -> list[str]:
        """Write the last shard, give every shard its final name, write the index (N > 1); returns the file names."""
        self._flush()
        if not self._shards:
            raise ValueError(f"no tensors were added to {self.folder}; nothing to finish")
        names = shard_names(self.fmt, len(self._shards))
        for shard, name in zip(self._shards, names):
            os.replace(self.folder / shard["file"], self.folder / name)
        if len(names) > 1:
            weight_map = {tensor: name for shard, name in zip(self._shards, names) for tensor in shard["tensors"]}
            index = {"metadata": {"total_size": sum(shard["bytes"] for shard in self._shards)},
                     "weight_map": weight_map}
            _write_atomically(self.folder / index_name(self.fmt), json.dumps(index, indent=2) + "\n")
        (self.folder / STATE_FILE).unlink()
        return names

    # ------------------------------------------------------------ internals

    def _prepare(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if tensor.is_meta:
            raise ValueError(f"tensor {name!r} is on the meta device: write a block's tensors before releasing it")
        out = to_float16(name, tensor) if self.fmt == "atlas" and tensor.is_floating_point() else tensor.to("cpu")
        # A copy of its own: the caller may change its tensor later, and safetensors wants one storage per
        # name (tied weights, slices of one tensor).
        if out.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
            out = out.clone(memory_format=torch.contiguous_format)
        return out.contiguous()

    def _flush(self) -> None:
        if not self._pending:
            return
        number = len(self._shards) + 1
        partial = self.folder / f"{self._prefix}-{number:05d}.partial.safetensors"
        done = self.folder / f"{self._prefix}-{number:05d}.tmp.safetensors"
        save_file(self._pending, str(partial), metadata={"format": "pt"})
        os.replace(partial, done)
        self._shards.append({"file": done.name, "tensors": list(self._pending), "bytes": self._pending_bytes})
        self._save_state()
        self._pending, self._pending_bytes = {}, 0

    def _save_state(self) -> None:
        state = {"format": self.fmt, "shard_size": self.shard_size, "shards": self._shards}
        _write_atomically(self.folder / STATE_FILE, json.dumps(state, indent=1) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
