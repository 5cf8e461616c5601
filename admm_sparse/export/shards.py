"""Size-capped safetensors shards, written as blocks finish, with what is already on disk known for resume.

`ShardWriter(folder, fmt, shard_size)` writes the tensors of every `add()` call to disk at once, as a piece
file of its own, so that memory never holds more than one block's tensors however large the shards are, and
what a killed run had added is on disk. While running, the folder holds:
- `.pieces/piece-00007.safetensors`: the tensors of one add() (written as `.partial`, then renamed);
- `.shard_writer.json`: the writer's state (format, shard size, the pieces and their tensors), replaced
  atomically after each piece, so `ShardWriter.reopen(folder, ...)` after a killed run keeps the pieces,
  drops a partial one and numbers on; `written()` is what need not be added again.

`finish()` cuts the tensors, in the order they were added, into shards of at most `shard_size` bytes of
tensor data (a tensor larger than a shard gets one of its own), writes each shard by copying the tensors'
bytes from the pieces (no tensor is loaded), writes the index, and drops the pieces and the state:
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
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atlas import WEIGHTS_FILE as ATLAS_WEIGHTS_FILE
from ..source import header_and_offset
from .atlas import to_float16

STATE_FILE = ".shard_writer.json"
PIECES = ".pieces"
COPY_CHUNK = 64 << 20  # bytes copied from a piece into a shard at a time
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
    from . import checkpoint_state_dict

    tied_copies = set(getattr(model, "all_tied_weights_keys", None) or {})
    return checkpoint_state_dict(model, {k: v for k, v in tensors.items() if k not in tied_copies})


class ShardWriter:
    """Writes finished tensors to disk at once and cuts them into size-capped shards at the end, in `folder`
    (see the module docstring). fmt: "hf" or "atlas". shard_size: bytes of tensor data per shard, an int or
    a string for parse_size."""

    def __init__(self, folder: str | Path, fmt: str, shard_size: int | str):
        folder = Path(folder)
        if (folder / STATE_FILE).exists():
            raise FileExistsError(f"{folder} holds the tensors of an earlier run; continue it with "
                                  "ShardWriter.reopen, or write into an empty folder")
        (folder / PIECES).mkdir(parents=True, exist_ok=True)
        self._setup(folder, fmt, shard_size, {"pieces": []})
        self._save_state()  # from the start, so that a run killed before its first piece can be reopened

    @classmethod
    def reopen(cls, folder: str | Path, fmt: str, shard_size: int | str) -> ShardWriter:
        """The writer of an earlier, interrupted run in `folder`: the pieces it had written are kept, one it was
        writing is deleted, numbering continues. Tensors not in written() must be added again."""
        folder = Path(folder)
        if not (folder / STATE_FILE).is_file():
            raise FileNotFoundError(f"{folder} has no {STATE_FILE}: there is no interrupted run to continue there")
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        writer = cls.__new__(cls)
        writer._setup(folder, fmt, shard_size, state)
        if (state["format"], state["shard_size"]) != (writer.fmt, writer.shard_size):
            raise ValueError(f"{folder} was written as format {state['format']!r} with shards of "
                             f"{state['shard_size']} bytes; resume with the same format and shard size "
                             f"(not {fmt!r}, {writer.shard_size}), or start over")
        if "finished" not in state:
            for piece in writer._pieces:
                if not (folder / PIECES / piece["file"]).is_file():
                    raise FileNotFoundError(f"{folder / PIECES / piece['file']} is listed as written but is missing; "
                                            "the folder was changed since: start over")
            kept = {piece["file"] for piece in writer._pieces}
            for path in (folder / PIECES).iterdir():  # a piece being written when the run was killed
                if path.name not in kept:
                    path.unlink()
        for path in folder.glob("*.partial.safetensors"):  # a shard being written by a killed finish()
            path.unlink()
        return writer

    def _setup(self, folder: Path, fmt: str, shard_size: int | str, state: dict) -> None:
        if fmt not in LAYOUTS:
            raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(LAYOUTS)}")
        self.folder, self.fmt, self.shard_size = folder, fmt, parse_size(shard_size)
        self._pieces = state["pieces"]  # {"file", "tensors": [[name, bytes], ...]}, in the order added
        self._finished = state.get("finished")  # the final files, once finish() wrote them all

    def written(self) -> list[str]:
        """Names of the tensors safely on disk, in the order they were added."""
        return [name for piece in self._pieces for name, _ in piece["tensors"]]

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write tensors (copied to CPU; float16 for Atlas) to disk now, as one piece."""
        done = set(self.written())
        prepared = {}
        for name, tensor in tensors.items():
            if name in done or name in prepared:
                raise ValueError(f"tensor {name!r} was already added to {self.folder}")
            prepared[name] = self._prepare(name, tensor)
        if not prepared:
            return
        piece = f"piece-{len(self._pieces) + 1:05d}.safetensors"
        partial = self.folder / PIECES / f"{piece}.partial"
        save_file(prepared, str(partial), metadata={"format": "pt"})
        os.replace(partial, self.folder / PIECES / piece)
        self._pieces.append({"file": piece, "tensors": [[n, t.numel() * t.element_size()] for n, t in prepared.items()]})
        self._save_state()

    def finish(self) -> list[str]:
        """Cut the tensors into shards and write them, with the index when N > 1; returns the shard file names."""
        if self._finished is None:
            shards = self._plan()
            if not shards:
                raise ValueError(f"no tensors were added to {self.folder}; nothing to finish")
            names = shard_names(self.fmt, len(shards))
            headers = {piece["file"]: header_and_offset(self.folder / PIECES / piece["file"]) for piece in self._pieces}
            for shard, name in zip(shards, names):
                _assemble(self.folder / name, [(tensor, self.folder / PIECES / piece, *headers[piece])
                                               for tensor, piece in shard])
            if len(names) > 1:
                weight_map = {tensor: name for shard, name in zip(shards, names) for tensor, _ in shard}
                total = sum(size for piece in self._pieces for _, size in piece["tensors"])
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                _write_atomically(self.folder / index_name(self.fmt), json.dumps(index, indent=2) + "\n")
            self._finished = names
            self._save_state()
        shutil.rmtree(self.folder / PIECES, ignore_errors=True)
        (self.folder / STATE_FILE).unlink()
        return self._finished

    # ------------------------------------------------------------ internals

    def _plan(self) -> list[list[tuple[str, str]]]:
        """[(tensor, piece file), ...] per shard: in the order added, a new shard when the next tensor would take
        the shard past shard_size (a tensor larger than a shard gets one of its own)."""
        shards, size = [], 0
        for piece in self._pieces:
            for name, nbytes in piece["tensors"]:
                if not shards or (shards[-1] and size + nbytes > self.shard_size):
                    shards.append([])
                    size = 0
                shards[-1].append((name, piece["file"]))
                size += nbytes
        return shards

    def _prepare(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if tensor.is_meta:
            raise ValueError(f"tensor {name!r} is on the meta device: write a block's tensors before releasing it")
        out = to_float16(name, tensor) if self.fmt == "atlas" and tensor.is_floating_point() else tensor.to("cpu")
        # A copy of its own: safetensors wants one storage per name (tied weights, slices of one tensor).
        if out.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
            out = out.clone(memory_format=torch.contiguous_format)
        return out.contiguous()

    def _save_state(self) -> None:
        state = {"format": self.fmt, "shard_size": self.shard_size, "pieces": self._pieces}
        if self._finished is not None:
            state["finished"] = self._finished
        _write_atomically(self.folder / STATE_FILE, json.dumps(state, indent=1) + "\n")


def _assemble(path: Path, entries: list[tuple[str, Path, dict, int]]) -> None:
    """Write a safetensors file holding the named tensors, copying each one's bytes from the file it is in
    (entries: (name, file, that file's header, where its data starts)); written beside and renamed, so it is
    never half there."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, _, headers, _ in entries:
        entry = headers[name]
        begin, end = entry["data_offsets"]
        header[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    partial = path.with_name(path.stem + ".partial.safetensors")
    with open(partial, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for name, source, headers, start in entries:
            begin, end = headers[name]["data_offsets"]
            with open(source, "rb") as f:
                f.seek(start + begin)
                remaining = end - begin
                while remaining:
                    chunk = f.read(min(remaining, COPY_CHUNK))
                    out.write(chunk)
                    remaining -= len(chunk)
    os.replace(partial, path)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
