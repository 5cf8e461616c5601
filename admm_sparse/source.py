"""Where the block loop's weights come from: a model in memory (`InMemorySource`, each block moved to the compute
device for its turn), or a model too large for memory, read from its Hugging Face folder one part at a time
(`StreamingSource` over the `LazySource` below).

`LazySource(folder)` opens a folder holding safetensors weights (`model.safetensors`, or shards listed in
`model.safetensors.index.json`) and builds:
- the model's skeleton: `AutoModelForCausalLM.from_config` on the meta device, so no weight memory is used;
- an index from every state_dict name of the skeleton to the checkpoint keys (and files) it is made of.

`materialize(prefix, device)` then reads exactly the tensors of one submodule (memory-mapped safetensors
reads of just those keys), casts them to the model's dtype and puts them into the skeleton on `device`;
`release(prefix)` puts them back on the meta device, freeing their memory. `materialize_outside(stack)` /
`release_outside(stack)` do the same for everything outside the block stack (embeddings, rotary buffers,
final norm, lm_head). The result equals `from_pretrained(folder)` bit for bit, because the loading rules are
transformers' own (transformers 5):
- checkpoint keys are renamed with the model's conversion mapping (`transformers.conversion_mapping`:
  legacy names, an added or dropped `model.` prefix);
- checkpoint keys that several model tensors are made of go through transformers' `WeightConverter` of
  that mapping: e.g. fused MoE experts, per expert `mlp.experts.<e>.gate_proj/up_proj/down_proj.weight` on
  disk, one 3D `mlp.experts.gate_up_proj` ([experts, 2 * intermediate, hidden], gate rows first) and
  `mlp.experts.down_proj` in memory. A block's converters run on that block's tensors only;
- tied weights (lm_head = embed_tokens when `config.tie_word_embeddings`) are one parameter: the checkpoint
  may hold either name; materialising or releasing one name of a tied group does the whole group;
- non-persistent buffers (rotary `inv_freq`) are not in checkpoints: they are computed once, on CPU, by the
  model's own `initialize_weights` (as from_pretrained computes them) and copied to the device with their
  submodule;
- checkpoint keys that the model lacks are ignored (as from_pretrained does); a model tensor that no
  checkpoint key provides, or a shape that differs, is an error when the source is opened.
"""
from __future__ import annotations

import copy
import hashlib
import json
import struct
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .stream import parent_module

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file: {name: {"dtype", "shape", "data_offsets"}, "__metadata__": ...}."""
    return header_and_offset(path)[0]


def header_and_offset(path: str | Path) -> tuple[dict, int]:
    """A safetensors file's header and the offset where its tensor data starts."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def read_tensor(path: Path, key: str, header: dict, start: int) -> torch.Tensor:
    """One tensor of a safetensors file, read into memory of its own. Not through a memory map: a map's pages
    count as resident while the file is open, doubling the memory a large tensor (an embedding) takes while
    it loads, and the tensor must not follow later changes to the file."""
    info = header[key]
    begin, end = info["data_offsets"]
    data = torch.empty(end - begin, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(start + begin)
        f.readinto(memoryview(data.numpy()))
    return data.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def checkpoint_files(folder: str | Path) -> list[str]:
    """Names of the folder's safetensors weight files, in order."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    if (folder / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise FileNotFoundError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}; a model is read lazily only from "
                            "safetensors weights (re-save it with save_pretrained(..., safe_serialization=True))")


class _Group:
    """Checkpoint tensors that make some model tensors: one key renamed, or several through a converter."""

    __slots__ = ("name", "converter", "sources")

    def __init__(self, name: str, converter):
        self.name = name            # the model name the first checkpoint key was renamed to
        self.converter = converter  # transformers' WeightConverter, None for a plain (renamed) key
        self.sources: list[tuple[str, str, str]] = []  # (source pattern, checkpoint key, file), in load order


class LazySource:
    """The model of a Hugging Face safetensors folder, materialised one submodule at a time.

    folder: a Hugging Face folder with config.json and safetensors weights.
    dtype: the dtype of the floating tensors; default the config's (as from_pretrained's "auto").
    Attributes: model (the skeleton; its tensors are on meta until materialised), config, folder, dtype,
    files (weight file names), index ({state_dict name: ((file, checkpoint key), ...)}).
    """

    def __init__(self, folder: str | Path, dtype: torch.dtype | str | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = Path(folder)
        self.files = checkpoint_files(self.folder)
        headers = {file: read_header(self.folder / file) for file in self.files}
        self.config = AutoConfig.from_pretrained(self.folder)
        if getattr(self.config, "quantization_config", None) is not None:
            raise ValueError(f"{self.folder} holds quantised weights ({self.config.quantization_config}); a lazy "
                             "source reads float weights only: load this model with from_pretrained instead")
        self.dtype = _model_dtype(dtype, self.config, headers)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        self.model.eval()
        self._keep_in_float32()
        self._computed_buffers = _non_persistent_buffers(self.model)
        self._ties = _tied_groups(self.model)
        self._targets = self._build_index(headers)
        self.index = {name: tuple((file, key) for _, key, file in group.sources)
                      for name, (group, _) in self._targets.items()}

    # ------------------------------------------------------------ public API

    def materialize(self, prefix: str, device: str | torch.device = "cpu") -> nn.Module:
        """Load the submodule `prefix` ("model.layers.3"; "" for the whole model) onto `device`; returns it.
        Its tensors are read from the files again, replacing any values it had."""
        prefix = prefix.rstrip(".")
        module = self.model.get_submodule(prefix)
        self._load([n for n in self._names() if _under(n, prefix)], torch.device(device))
        return module

    def release(self, prefix: str) -> None:
        """Put the tensors of the submodule `prefix` back on the meta device, freeing their memory."""
        prefix = prefix.rstrip(".")
        self._to_meta([n for n in self._names() if _under(n, prefix)])

    def materialize_outside(self, stack_name: str, device: str | torch.device = "cpu") -> None:
        """Load every tensor outside the block stack `stack_name` (embeddings, rotary buffers, norm, lm_head)."""
        stack_name = stack_name.rstrip(".")
        self._load([n for n in self._names() if not _under(n, stack_name)], torch.device(device))

    def release_outside(self, stack_name: str) -> None:
        """Put every tensor outside the block stack `stack_name` back on the meta device."""
        stack_name = stack_name.rstrip(".")
        self._to_meta([n for n in self._names() if not _under(n, stack_name)])

    def fingerprint(self) -> str:
        """A hash of config.json and the weight files as they are on disk now (names, sizes, and every tensor's
        name, dtype and shape): a resumed run checks that its source still has the same one."""
        digest = hashlib.sha256((self.folder / "config.json").read_bytes())
        for file in checkpoint_files(self.folder):
            path = self.folder / file
            tensors = {k: [v["dtype"], v["shape"]] for k, v in read_header(path).items() if k != "__metadata__"}
            entry = {"file": file, "size": path.stat().st_size, "tensors": tensors}
            digest.update(json.dumps(entry, sort_keys=True).encode())
        return digest.hexdigest()

    # ------------------------------------------------------------ the index

    def _build_index(self, headers: dict[str, dict]) -> dict[str, tuple[_Group, str]]:
        """{state_dict name: (group that makes it, the group's output name)}; checks that nothing is missing."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key

        model = self.model
        expected = model.state_dict()
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        keys = sorted(((key, file) for file, header in headers.items() for key in header if key != "__metadata__"),
                      key=lambda kf: dot_natural_key(kf[0]))  # from_pretrained's order: experts 0, 1, ..., 10
        groups: dict[str, _Group] = {}
        for key, file in keys:
            name, pattern = _rename(key, renamings, converters, model.base_model_prefix, expected)
            if name not in expected:
                continue  # a key the model lacks (an old rotary buffer, an unused head): ignored
            group = groups.setdefault(name, _Group(name, by_pattern[pattern] if pattern else None))
            group.sources.append((pattern or key, key, file))

        def empty(file, key, dtype):
            info = headers[file][key]
            return torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]], device="meta").to(dtype)

        targets: dict[str, tuple[_Group, str]] = {}
        for group in groups.values():
            # A dry run on meta tensors names a converter's outputs and checks their shapes, reading nothing.
            for out, tensor in self._convert(group, empty).items():
                if out in expected and tensor.shape != expected[out].shape:
                    _, key, file = group.sources[0]
                    raise ValueError(f"{self.folder}: tensor {out!r} has shape {list(tensor.shape)} in the checkpoint "
                                     f"({key} in {file}) but {list(expected[out].shape)} in the model its "
                                     "config.json builds")
                targets.setdefault(out, (group, out))

        for tied in self._ties:  # one parameter: made from the first of its names that the checkpoint has
            present = [n for n in tied if n in targets]
            if present:
                for name in tied:
                    targets.setdefault(name, targets[present[0]])
        missing = [n for n in expected if n not in targets]
        if missing:
            raise KeyError(f"{self.folder}: the checkpoint has no tensor for {len(missing)} model tensor(s): "
                           f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}; the weight files do not "
                           "match config.json (a missing shard, or another model's weights?)")
        return {name: targets[name] for name in expected}

    def _convert(self, group: _Group, read) -> dict[str, torch.Tensor]:
        """The model tensors a group makes; read(file, key, dtype) gives one checkpoint tensor in that dtype."""
        # Each checkpoint tensor is cast to its model tensor's dtype first, as from_pretrained does.
        dtype = self.model.get_parameter_or_buffer(group.name).dtype
        if group.converter is None:
            ((_, key, file),) = group.sources
            return {group.name: read(file, key, dtype)}
        converter = copy.deepcopy(group.converter)  # it collects tensors: one instance per group
        for pattern, key, file in group.sources:
            converter.add_tensor(group.name, key, pattern, read(file, key, dtype))
        outputs = converter.convert(group.name, model=self.model, config=self.config)
        return {name: t[0] if isinstance(t, list) else t for name, t in outputs.items()}

    # ------------------------------------------------------------ loading and releasing

    def _names(self) -> list[str]:
        return [*self._targets, *self._computed_buffers]

    def _with_ties(self, names: list[str]) -> list[str]:
        # A tied group is one tensor: it is on meta or materialised as a whole.
        wanted = set(names)
        for tied in self._ties:
            if wanted & set(tied):
                wanted.update(tied)
        return [n for n in self._names() if n in wanted]

    def _load(self, names: list[str], device: torch.device) -> None:
        names = self._with_ties(names)
        headers = {}

        def read(file, key, dtype):
            if file not in headers:
                headers[file] = header_and_offset(self.folder / file)
            return read_tensor(self.folder / file, key, *headers[file]).to(device=device, dtype=dtype)

        wanted: dict[int, tuple[_Group, dict[str, list[str]]]] = {}
        for name in names:
            if name in self._targets:
                group, out = self._targets[name]
                wanted.setdefault(id(group), (group, {}))[1].setdefault(out, []).append(name)
        for group, outs in wanted.values():
            tensors = self._convert(group, read)
            for out, targets in outs.items():
                self._put(targets, tensors[out])
        for name in names:
            if name in self._computed_buffers:
                self._put([name], self._computed_buffers[name].to(device, copy=True))

    def _put(self, names: list[str], tensor: torch.Tensor) -> None:
        """Make `tensor` the value of every name in `names` (tied names share one parameter)."""
        param = None
        for name in names:
            module_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            if attr in module._parameters:
                if param is None:
                    param = nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)
                module._parameters[attr] = param
            else:
                module._buffers[attr] = tensor

    def _to_meta(self, names: list[str]) -> None:
        metas: dict[int, nn.Parameter] = {}  # by the old parameter: tied names stay one parameter
        for name in self._with_ties(names):
            module_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            if attr in module._parameters:
                old = module._parameters[attr]
                if id(old) not in metas:
                    metas[id(old)] = nn.Parameter(torch.empty_like(old, device="meta"), requires_grad=old.requires_grad)
                module._parameters[attr] = metas[id(old)]
            else:
                module._buffers[attr] = torch.empty_like(module._buffers[attr], device="meta")

    def _keep_in_float32(self) -> None:
        """Tensors the model keeps in float32 whatever its dtype (`_keep_in_fp32_modules`), as from_pretrained does."""
        from transformers.core_model_loading import build_glob_alternation

        plan = self.model._get_dtype_plan(self.dtype)
        if not plan:
            return
        pattern, group_to_glob, _ = build_glob_alternation(list(plan))
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            match = pattern.search(name)
            if match and tensor.is_floating_point():
                self._put([name], tensor.to(plan[group_to_glob[match.lastgroup]]))


# ---------------------------------------------------------------- helpers

def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name.startswith(prefix + ".")


def _model_dtype(dtype, config, headers: dict[str, dict]) -> torch.dtype:
    """The given dtype, else the config's, else the checkpoint's first float tensor's (from_pretrained's "auto")."""
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None)
    if dtype is None:
        floats = (_SAFETENSORS_DTYPES.get(v["dtype"]) for h in headers.values() for k, v in h.items()
                  if k != "__metadata__")
        dtype = next((d for d in floats if d is not None and d.is_floating_point), torch.float32)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. float32, float16 or bfloat16")
        dtype = getattr(torch, dtype)
    return dtype


def _rename(key, renamings, converters, base_model_prefix, expected) -> tuple[str, str | None]:
    """(model name, converter source pattern or None) for a checkpoint key, by from_pretrained's rules."""
    from transformers.core_model_loading import rename_source_key

    name, pattern = rename_source_key(key, renamings, converters, base_model_prefix, expected)
    if name not in expected and key in expected:  # a key that should not have been renamed
        name, pattern = rename_source_key(key, [], [], base_model_prefix, expected)
    return name, pattern


def _tied_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """Names that share one parameter (lm_head.weight and embed_tokens.weight), the tie's source first."""
    by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append(name)
    tied_targets = getattr(model, "all_tied_weights_keys", None) or {}
    return [tuple(sorted(names, key=lambda n: n in tied_targets)) for names in by_param.values() if len(names) > 1]


def _non_persistent_buffers(model) -> dict[str, torch.Tensor]:
    """{name: CPU value} of the skeleton's non-persistent buffers, which no checkpoint holds.

    from_pretrained computes them with the model's initialize_weights; the same call here, with every
    parameter still on meta, fills only these buffers. They start as NaN, so one it leaves unset is seen.
    """
    names = []
    for module_name, module in model.named_modules():
        for attr in module._non_persistent_buffers_set:
            buffer = module._buffers.get(attr)
            if buffer is not None:
                fill = float("nan") if buffer.is_floating_point() else 0
                module._buffers[attr] = torch.full_like(buffer, fill, device="cpu")
                names.append(f"{module_name}.{attr}" if module_name else attr)
    model.initialize_weights()
    values = {name: model.get_buffer(name) for name in names}
    unset = [name for name, value in values.items() if value.is_floating_point() and value.isnan().any()]
    if unset:
        raise NotImplementedError(f"{type(model).__name__}.initialize_weights does not compute the buffer(s) "
                                  f"{', '.join(unset)}; this model cannot be read lazily: load it with from_pretrained")
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._buffers[attr] = torch.empty_like(module._buffers[attr], device="meta")
    return values


class StreamingSource:
    """The block loop's model source (pipeline.prune_blocks) for a LazySource: each block is read from the files
    for its turn and released after it; what precedes and follows the stack only while it is needed."""

    def __init__(self, lazy: LazySource):
        self.lazy = lazy

    @contextmanager
    def outside(self, stack_name: str, device: torch.device):
        self.lazy.materialize_outside(stack_name, device)
        try:
            yield
        finally:
            self.lazy.release_outside(stack_name)

    @contextmanager
    def block(self, stack_name: str, i: int, device: torch.device):
        prefix = f"{stack_name}.{i}"
        try:
            yield self.lazy.materialize(prefix, device)
        finally:
            self.lazy.release(prefix)


class InMemorySource:
    """The whole model is in memory: a block moves to the compute device for its turn and back after it;
    what runs before and after the stack (embeddings, final norm, head) likewise while it is needed."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.home = next(model.parameters()).device

    @contextmanager
    def outside(self, stack_name: str, device: torch.device):
        self._move_all_but(stack_name, device)
        try:
            yield
        finally:
            self._move_all_but(stack_name, self.home)

    def _move_all_but(self, stack_name: str, device: torch.device) -> None:
        parent, attr = parent_module(self.model, stack_name)
        blocks = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleList())
        try:
            self.model.to(device)
        finally:
            setattr(parent, attr, blocks)

    @contextmanager
    def block(self, stack_name: str, i: int, device: torch.device):
        block = self.model.get_submodule(stack_name)[i].to(device)
        try:
            yield block
        finally:
            block.to(self.home)
