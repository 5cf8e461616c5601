"""One prune job, from a model to a finished output folder: the library behind `admm-sparse prune`.

A Hugging Face folder with safetensors weights is streamed (source.LazySource: the model is a skeleton and
only the block being pruned is in memory); any other model (a GGUF file, a model object) is pruned in
memory. Either way the block loop (pipeline.prune_blocks) hands each finished block to a shard writer in the
output's work folder `.<out>.partial` (export.resumable_output), so memory does not grow with depth, and a
run that is killed continues from the last finished block with resume=True (resume.ResumeState), with the
same result bit for bit. Nothing is at `out` until the whole folder is complete.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from .config import PLACEMENT_OPTIONS, FloatSparseConfig
from .distributed import Group
from .export import (DEFAULT_SHARD_SIZE, REPORT_FILE, ModelWriter, resumable_output, sparse_tensor_names,
                     write_metadata)
from .export.atlas import DESCRIPTION_FILE
from .export.shards import STATE_FILE, ShardWriter, parse_size
from .pipeline import PruneResult, prune_blocks
from .resume import ResumeState, digest
from .size import layer_sizes, measure_folder
from .source import LazySource, StreamingSource

def streamable(path: str | Path) -> bool:
    """Whether `path` is a Hugging Face folder whose safetensors weights can be read block by block."""
    path = Path(path)
    return (path.is_dir() and (path / "config.json").is_file() and not (path / DESCRIPTION_FILE).is_file()
            and ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()))


def prune_to_folder(model, calib: torch.Tensor, out: str | Path, config: FloatSparseConfig | None = None, *,
                    fmt: str = "atlas", tokenizer=None, source: LazySource | None = None,
                    shard_size: int | str = DEFAULT_SHARD_SIZE, device=None, batch_size: int = 1, progress: bool = True,
                    blocks: str | None = None, eval_windows: torch.Tensor | None = None, resume: bool = False,
                    force: bool = False, protect: Iterable[str | Path] = (), report: dict | None = None,
                    finish_report=None, dtype_check=None, group: Group | None = None) -> PruneResult:
    """Prune `model` (a LazySource's skeleton when `source` is given) block by block and write it to `out`.

    Shards of at most shard_size. dtype_check: a deploy.DtypeCheck run on the pruned blocks. The report
    (`report`, completed by finish_report(result, report) with the result's rows, perplexities, seconds and
    peak memory) is saved as prune_report.json. resume: continue the run that was interrupted while writing
    `out`; it must have had the same model files, config, calibration and evaluation windows, format, shard
    size and stack (else a ValueError says which differ). force: replace an existing `out`, and start over an
    interrupted run's folder. group: the processes sharing the work (distributed.Group): all of them call
    this, rank 0 writes; a run of several processes cannot be resumed. The report's "size" and each row's
    "size" are the written weights' compressed sizes (admm_sparse.size).
    """
    config = config or FloatSparseConfig()
    group = group or Group()
    streaming = StreamingSource(source) if source is not None else None
    if group.rank != 0:  # the others share the work; rank 0 writes
        return prune_blocks(model, calib, config, device=device, batch_size=batch_size, progress=False,
                            blocks=blocks, source=streaming, eval_windows=eval_windows, dtype_check=dtype_check,
                            group=group)
    if resume and group.size > 1:
        raise ValueError("--resume continues a run of one process; a run of several processes keeps no state to "
                         "resume from")
    if resume and config.distill_epochs > 0:
        raise ValueError("--resume continues a run from its last finished block; with distillation (distill_epochs) "
                         "no block is finished before the whole model is fitted, so there is no state to resume "
                         "from: start again with --force instead of --resume")
    # where the work happens (PLACEMENT_OPTIONS) may change on resume: a run out of device memory goes on with
    # its streams in host memory
    what = {k: v for k, v in config.to_dict().items() if k not in PLACEMENT_OPTIONS}
    fingerprint = {"model": source.fingerprint() if source is not None else None, "config": what,
                   "calibration windows": digest(calib),
                   "evaluation windows": None if eval_windows is None else digest(eval_windows),
                   "format": fmt, "shard size": parse_size(shard_size), "blocks": blocks}
    keep = lambda work: ResumeState(work, fingerprint).exists()  # noqa: E731 - something to resume from
    with resumable_output(out, force, resume, protect, keep) as work:
        state = ResumeState(work, fingerprint) if group.size == 1 and not config.distill_epochs else None
        if state is not None and state.exists():
            state.check()  # before the expensive part
        resuming = (work / STATE_FILE).is_file()
        shards = ShardWriter.reopen(work, fmt, shard_size) if resuming else ShardWriter(work, fmt, shard_size)
        result = prune_blocks(model, calib, config, device=device, batch_size=batch_size, progress=progress,
                              blocks=blocks, source=streaming, writer=ModelWriter(model, shards), state=state,
                              eval_windows=eval_windows, dtype_check=dtype_check, group=group)
        names = shards.written()
        shards.finish()
        pruned = [row["name"] for row in result.rows]
        write_metadata(model, work, fmt, tokenizer, pruned, names)
        report = dict(report or {})
        report["size"] = _size_report(model, work, pruned, result.rows)
        if finish_report is not None:
            report = finish_report(result, report)
        (work / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if state is not None:
            state.remove()
    return result


def _size_report(model, folder: Path, pruned: list[str], rows: list[dict]) -> dict:
    """The compressed size (admm_sparse.size) of the weights written to `folder`: totals of the pruned layers'
    tensors ("selected") and of all tensors, in float16 as the card stores them (an "hf" folder's tensors are
    measured as they would be in float16; one beyond float16's range is listed in not_measured, the export kept).
    Each row whose layer's tensors carry its name gets its own "size"."""
    measured = measure_folder(folder, selected=sparse_tensor_names(model, pruned),
                              selection="the pruned layers' weights and biases")
    for layer, size in layer_sizes(measured, pruned).items():
        next(row for row in rows if row["name"] == layer)["size"] = size.to_dict()
    return measured.to_dict(per_tensor=False)
