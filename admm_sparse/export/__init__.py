"""Writing pruned models, atomically: the Atlas W16A16S folder (SPEC §5) or a Hugging Face folder, their
weights in size-capped shards (export.shards) in the layout of the model's checkpoint on disk.

Everything is written into a temporary folder beside the output and renamed into place at the end,
so a failed or interrupted export leaves no half-written output; an existing output is replaced only
with force=True; the input model's folder is never written to.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

FORMATS = ("atlas", "hf")
REPORT_FILE = "prune_report.json"
DEFAULT_SHARD_SIZE = "5GB"  # as transformers 4 wrote them


def drop_gguf_quantization(model) -> None:
    """Forget the gguf "quantization" of a model that transformers dequantised from a GGUF file.

    Its Linear layers are plain floats, but the leftover entry makes save_pretrained refuse to save
    and would tell loaders of the exported config.json that the weights are quantised.
    """
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)).lower() != "gguf":
        return
    del model.config.quantization_config
    for attr, value in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attr):
            setattr(model, attr, value)


def checkpoint_state_dict(model, state_dict: dict | None = None) -> dict:
    """The model's tensors (or those of `state_dict`, a part of them) under the names and in the layout of its
    checkpoint on disk, as save_pretrained writes them: transformers 5 keeps an MoE block's experts fused in
    3D parameters in memory but stores them per expert (e.g. mlp.experts.3.gate_proj.weight)."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    if getattr(model, "config", None) is None:
        return dict(state_dict)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: the checkpoint layout is the module layout
        return dict(state_dict)
    return revert_weight_conversion(model, dict(state_dict))


def sparse_tensor_names(model, pruned: Iterable[str]) -> set[str]:
    """Checkpoint names (see checkpoint_state_dict) of the tensors that hold the pruned layers' weights and
    biases. pruned: layer names as the pipeline reports them (admm_sparse.targets). Found by marking each
    layer's region of its parameter and letting transformers re-split the marks into the checkpoint layout,
    so an expert's slice of a fused parameter lands on exactly the tensor stored for it. One block's marks
    at a time (a byte per weight), so this needs no memory in proportion to the model."""
    import torch

    from ..targets import find_targets

    by_name = {t.name: t for t in find_targets(model.named_modules())}
    params = dict(model.named_parameters(remove_duplicate=False))
    per_block: dict[str, list] = {}
    for layer in pruned:
        target = by_name.get(layer)
        if target is None:
            raise ValueError(f"pruned layer {layer!r} is not a prunable layer of this model")
        per_block.setdefault(_block_of(target.param_name), []).append(target)
    sparse = set()
    for targets in per_block.values():
        marks: dict[str, torch.Tensor] = {}
        for target in targets:
            for name, view_of in ((target.param_name, target.view_of), (target.bias_name, target.bias_view_of)):
                if name is not None:
                    mark = marks.setdefault(name, torch.zeros(params[name].shape, dtype=torch.bool))
                    view_of(mark).fill_(True)
        sparse |= {name for name, mark in checkpoint_state_dict(model, marks).items() if mark.any()}
    return sparse


def _block_of(name: str) -> str:
    """The block a tensor name belongs to: its name up to the first index ("model.layers.3"), or "" outside."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return "" if index is None else ".".join(parts[: index + 1])


def _is_inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(out: str | Path, force: bool = False, protect: Iterable[str | Path] = ()) -> None:
    """Fail early if `out` exists (without force) or is or contains one of the `protect` paths (the input model)."""
    out = Path(out).absolute()
    for path in protect:
        if _is_inside(Path(path).resolve(), out.resolve()):
            raise ValueError(f"refusing to write the output to {out}: it would overwrite the input model {path}; "
                             "choose another --out")
    if out.exists() and not force:
        raise FileExistsError(f"output {out} already exists; choose another --out or pass --force to replace it")


def _ordinary_permissions(folder: Path) -> None:
    # mkdtemp (and safetensors) create private files; the output should be readable like any other folder.
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_output(out: str | Path, force: bool = False, protect: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `out` when the block ends without an exception.

    protect: input paths (the model) that the output must neither be nor contain.
    """
    check_output(out, force, protect)
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _move_into_place(tmp, out)
    except BaseException:  # KeyboardInterrupt included: no partial output
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def work_folder(out: str | Path) -> Path:
    """Where a resumable run writes `out` until it is complete: `.<name>.partial` beside it."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.partial"


@contextmanager
def resumable_output(out: str | Path, force: bool = False, resume: bool = False,
                     protect: Iterable[str | Path] = (), keep: Callable[[Path], bool] = lambda work: False
                     ) -> Iterator[Path]:
    """Like atomic_output, but the work folder is work_folder(out), a fixed name, so that a run that was killed
    (or failed) can be continued with resume=True. A failed run's folder is kept when keep(work) says it holds
    something to resume from, and deleted otherwise; force=True starts over, deleting an old one."""
    check_output(out, force, protect)
    out, work = Path(out).absolute(), work_folder(out)
    if work.exists() and not resume:
        if not force:
            raise FileExistsError(f"an interrupted run left {work}; pass --resume to continue it, or --force to "
                                  "start over")
        shutil.rmtree(work)
    elif resume and not work.exists():
        raise FileNotFoundError(f"--resume: there is no interrupted run to continue ({work} does not exist)")
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
        _move_into_place(work, out)
    except BaseException:
        if not keep(work):
            shutil.rmtree(work, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` to `out`, replacing an old `out` (the caller checked force)."""
    _ordinary_permissions(tmp)
    if out.exists() or out.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) / out.name
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash.parent)
    else:
        tmp.rename(out)


class ModelWriter:
    """Writes a model's tensors, given under their state_dict names, into a ShardWriter in the layout of the
    model's checkpoint on disk: for "hf" what save_pretrained writes (a tied copy once), for "atlas" every name
    (tied copies stored under each, as SPEC §5 has it). Tensors already on disk (a resumed run) are skipped."""

    def __init__(self, model, shards):
        self.model, self.shards = model, shards

    def add(self, tensors: dict) -> None:
        from .shards import hf_checkpoint_tensors

        if self.shards.fmt == "hf":
            tensors = hf_checkpoint_tensors(self.model, tensors)
        else:
            tensors = checkpoint_state_dict(self.model, tensors)
        done = set(self.shards.written())
        self.shards.add({name: t for name, t in tensors.items() if name not in done})


def write_metadata(model, folder: Path, fmt: str, tokenizer=None, pruned: Iterable[str] = (),
                   names: Iterable[str] = ()) -> None:
    """Everything of an output folder but the weights: config (float16 for Atlas) and generation config, the
    Atlas description of the tensors `names` (the pruned layers' W16A16S), the tokenizer."""
    from .atlas import DESCRIPTION_FILE, atlas_description, write_config

    if fmt == "atlas":
        write_config(model, folder)
        description = atlas_description(names, sparse_tensor_names(model, pruned))
        (folder / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    else:
        drop_gguf_quantization(model)  # a dequantised GGUF model is a plain float model; save it as one
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def export_model(model, out: str | Path, pruned: Iterable[str], fmt: str = "atlas", tokenizer=None,
                 force: bool = False, report: dict | None = None, protect: Iterable[str | Path] = (),
                 shard_size: int | str = DEFAULT_SHARD_SIZE) -> Path:
    """Write `model` (in memory) to the folder `out` in format "atlas" (SPEC §5) or "hf"; returns the folder.

    pruned: names of the pruned layers as the pipeline reports them (their tensors are marked W16A16S in the
    Atlas description). report: saved as prune_report.json inside the folder when given. Weight files of at
    most shard_size, numbered with an index beyond one (export.shards).
    """
    from .shards import ShardWriter

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    pruned = list(pruned)
    with atomic_output(out, force=force, protect=protect) as tmp:
        shards = ShardWriter(tmp, fmt, shard_size)
        ModelWriter(model, shards).add(model.state_dict())
        names = shards.written()
        shards.finish()
        write_metadata(model, tmp, fmt, tokenizer, pruned, names)
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return Path(out)
