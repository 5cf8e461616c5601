"""Resuming an interrupted run: what the block loop keeps in the output's work folder after every block.

- `state.json`: the next block to prune, the loop's data (the per-layer report rows so far, the blocks'
  seconds, the float16 check's result), and the
  run's fingerprint (the model files, the config, the calibration and evaluation windows, the output
  format and shard size): a resume with anything else is refused, naming what differs;
- `streams.pt`: the hidden states the next block receives (calibration windows, the dense and pruned
  evaluation streams, and with block reconstruction the dense model's calibration stream), exactly as they
  were, so the resumed result is bitwise the uninterrupted one.
Both are replaced atomically (written beside, then renamed), the streams first: a state.json always
describes streams that are on disk. The writer's finished shards sit beside them (export.shards).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .host_stream import stored

STATE_DIR = ".resume"


def digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and bytes: calibration data that differs in one token differs here."""
    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)} {t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())  # on disk before the rename makes it current (power loss)
    tmp.replace(path)


class ResumeState:
    """The state of a run in `folder` (the output's work folder). fingerprint: JSON-able description of
    everything the result depends on."""

    def __init__(self, folder: str | Path, fingerprint: dict):
        self.dir = Path(folder) / STATE_DIR
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from disk

    def exists(self) -> bool:
        return (self.dir / "state.json").is_file()

    def check(self) -> None:
        """Refuse to resume a run that was made with other inputs; names every part that differs."""
        saved = json.loads((self.dir / "state.json").read_text(encoding="utf-8"))["fingerprint"]
        differs = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
        if differs:
            raise ValueError(f"cannot resume: the interrupted run in {self.dir.parent} was made with a different "
                             f"{', '.join(differs)}; run with the same inputs, or pass --force instead of --resume "
                             "to start over")

    def save(self, next_block: int, streams: tuple, data: dict) -> None:
        """After a finished block: the next one's index, the hidden-state streams it takes (lists of tensors)
        and the loop's JSON-able data (report rows, seconds, ...)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        _replace(self.dir / "streams.pt",
                 lambda p: torch.save([[h.detach().cpu() for h in stored(stream)] for stream in streams], p))
        state = {"next_block": next_block, "data": data, "fingerprint": self.fingerprint}
        _replace(self.dir / "state.json", lambda p: p.write_text(json.dumps(state, default=_jsonable),
                                                                 encoding="utf-8"))

    def load(self, device: torch.device | str = "cpu"):
        """(next block, data, streams) as saved, the streams on `device`."""
        self.check()
        state = json.loads((self.dir / "state.json").read_text(encoding="utf-8"))
        streams = torch.load(self.dir / "streams.pt", weights_only=True)
        data = state["data"]
        if "rows" in data:  # JSON has no tuples: the report's shapes come back as they were
            data["rows"] = [{k: tuple(v) if k == "shape" else v for k, v in row.items()} for row in data["rows"]]
        return state["next_block"], data, tuple([h.to(device) for h in stream] for stream in streams)

    def remove(self) -> None:
        """Forget the state (the run finished): the folder becomes a plain output."""
        for path in self.dir.glob("*"):
            path.unlink()
        if self.dir.exists():
            self.dir.rmdir()


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
