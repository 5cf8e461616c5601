"""Streams of per-batch hidden states kept in host memory (stream_memory "host"): the block loop's streams are
most of its device memory (each is calibration tokens x hidden size x the dtype's bytes, 2 GiB for a 7B model
on 128 x 2048 tokens in bfloat16, and up to about ten are alive at once: README "Memory"), so on a GPU
smaller than that they stay in host memory and each batch moves to the device when a block reads it.

A HostStream is a read-only sequence: reading item b returns it on the compute device, a slice is another
HostStream; everything that reads a stream as a list (zip, indexing) works on it unchanged. Where a stream
makes another (a block run over it), `like` gives the new one the same kind, so the choice is made once, where
block 0's inputs are captured."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

HOST = torch.device("cpu")


class HostStream(Sequence):
    """Per-batch tensors (or None where a batch has none) stored on the host, read on `device`."""

    def __init__(self, tensors: Iterable[torch.Tensor | None], device: torch.device | str):
        self.device = torch.device(device)
        # one tensor at a time: a generator's items leave the device as they are made
        self.stored = [None if t is None else t.detach().to(HOST) for t in tensors]

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return HostStream(self.stored[index], self.device)
        t = self.stored[index]
        return None if t is None else t.to(self.device)


def hold(tensors: Iterable[torch.Tensor | None], device: torch.device | str, host: bool) -> list | HostStream:
    """A new stream of `tensors`: in host memory (read on `device`), or a list of them on `device`."""
    if host:
        return HostStream(tensors, device)
    return [None if t is None else t.to(device) for t in tensors]


def like(stream: Sequence, tensors: Iterable[torch.Tensor | None]) -> list | HostStream:
    """`tensors` held as `stream` is: a HostStream read on the same device, or a list."""
    return HostStream(tensors, stream.device) if isinstance(stream, HostStream) else list(tensors)


def subset(stream: Sequence, indices: Sequence[int]) -> list | HostStream:
    """The items of `stream` at `indices`, held as `stream` is (no copy to the device)."""
    if isinstance(stream, HostStream):
        return HostStream([stream.stored[i] for i in indices], stream.device)
    return [stream[i] for i in indices]


def stored(stream: Sequence) -> list:
    """The stream's tensors as they are stored (for saving; no copy to the device)."""
    return stream.stored if isinstance(stream, HostStream) else list(stream)
