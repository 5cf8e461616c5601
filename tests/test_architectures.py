"""Acceptance tests: whole-model pruning and export across architecture families (tests/archs.py builds
tiny random models of each: LLaMA, Qwen2, Qwen3, Mistral, Gemma3, Phi-3, OPT, GPT-2, Mixtral, Qwen3-MoE,
DeepSeek-V3), a multimodal wrapper, and tied weights.

What every family must satisfy (the layers "selected" are those admm_sparse's report names; tests/archs.py
derives the expected set from the model's own modules):
- every nn.Linear / Conv1D inside the decoder stack, and every expert of fused 3D MoE parameters
  (`<stack>.<b>.mlp.experts.<i>.gate_proj` / `up_proj` / `down_proj`, gate = first I rows of gate_up_proj,
  up = last I rows), is pruned; routers (`mlp.gate`), embeddings, norms and the (tied) output head never;
- each pruned weight has at least int(numel * 0.5) zeros, exactly the report's sparsity * numel. Not exactly
  int(numel * 0.5): the default keep-bit rounding (SPEC §3) keeps every zero a zero but flushes float16
  subnormal magnitudes (|w| < 2^-14, unless kept) to zero, so it can add zeros. With rounding off
  (keep_bits None) the count is exact, which the MoE ratio test checks;
- every other tensor is bitwise unchanged; the exported model loads and gives finite logits;
- the Atlas folder holds the tensors in the checkpoint layout that save_pretrained writes (per expert for
  fused MoE parameters), marks exactly the pruned weights (and their biases) W16A16S, and keeps the zeros.

Assumptions about the interface being built (the tests fail until it exists):
- CLI `--keep-bits none` turns the keep-bit rounding off; in Python FloatSparseConfig(keep_bits=None);
- CLI `--blocks NAME` names the block stack; a NAME that is not a candidate exits 2, naming the candidates;
- make_pruner(name, layer): for an expert, `layer` exposes `.weight`, the expert's [out, in] weight.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import archs
from admm_sparse.cli import main
from admm_sparse.config import FloatSparseConfig
from admm_sparse.pipeline import prune_model

# 8 windows of 64 tokens: 512 calibration tokens, below the 2048 the CLI recommends, on purpose (speed).
pytestmark = pytest.mark.filterwarnings("ignore:only \\d+ calibration tokens")

FAMILIES = list(archs.FAMILIES)
RATIO = 0.5
SAMPLES, SEQ_LEN = 8, 64
HEADER = {"version", "model_quant_type", "metadata", "group_size", "optional"}


# ---------------------------------------------------------------- helpers

def run_cli(*args) -> tuple[int, str, str]:
    """admm-sparse in-process: (exit status, stdout, stderr); argparse errors are exit statuses too."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def prune_cli(model_dir, calib, out, *extra) -> dict:
    """Prune with the CLI (CPU, no evaluation) and return the report; fails the test on a non-zero exit."""
    rc, stdout, stderr = run_cli("prune", "--model", model_dir, "--calib", calib, "--out", out,
                                 "--num-samples", SAMPLES, "--seq-len", SEQ_LEN, "--eval-windows", 0,
                                 "--device", "cpu", "--no-progress", *extra)
    assert rc == 0, f"admm-sparse exited {rc}:\n{stderr}\n{stdout[-2000:]}"
    return json.loads((out / "prune_report.json").read_text())


def check_zero_counts(weight: torch.Tensor, row: dict, ratio: float, name: str) -> None:
    numel = weight.numel()
    got = archs.zeros(weight)
    assert got >= int(numel * ratio), f"{name}: {got} zeros < int({numel} * {ratio})"
    assert got == round(row["sparsity"] * numel), f"{name}: {got} zeros, the report says {row['sparsity']}"


def check_only_layers_changed(dense: dict, new: dict, refs: list[archs.LayerRef]) -> None:
    """Every tensor, and every part of a fused tensor, outside the given layers' weights is bitwise equal."""
    assert set(new) == set(dense)
    masks: dict[str, torch.Tensor] = {}
    for ref in refs:
        m = ref.mask(dense)
        masks[ref.param] = masks[ref.param] | m if ref.param in masks else m
    for key, tensor in dense.items():
        keep = ~masks[key] if key in masks else torch.ones(tensor.shape, dtype=torch.bool)
        assert torch.equal(new[key][keep], tensor[keep]), f"{key} changed outside the pruned weights"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("archs")


@pytest.fixture(scope="module")
def calib(workdir):
    return archs.write_calibration(workdir / "calib.jsonl")


@pytest.fixture(scope="module")
def dense(workdir):
    """family -> (folder with the saved model + tokenizer, the in-memory model), built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            folder = workdir / f"dense-{family}"
            archs.save_family(family, folder)
            cache[family] = folder, archs.build(family)[1]
        return cache[family]
    return get


# ---------------------------------------------------------------- the factories themselves (pass today)

@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_runs_and_round_trips(family, dense):
    """The factory's model: finite, deterministic float32 logits; save_pretrained / from_pretrained give the
    same tensors and logits; the checkpoint layout holds every layer's weight as one tensor (per expert for
    fused MoE parameters); tokens reach every expert of every MoE block."""
    folder, model = dense(family)
    fam = archs.FAMILIES[family]
    assert type(model).__name__ == fam.model_class
    ids = archs.token_windows(2, SEQ_LEN, seed=5)
    logits = archs.logits(model, ids)
    assert torch.isfinite(logits).all() and torch.equal(logits, archs.logits(model, ids))

    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    state, back = model.state_dict(), loaded.state_dict()
    assert set(state) == set(back) and all(torch.equal(state[k], back[k]) for k in state)
    assert torch.equal(archs.logits(loaded, ids), logits)

    refs = archs.expected_layers(model, fam.stack)
    assert refs and all(archs.block_of(n, fam.stack) < len(model.get_submodule(fam.stack)) for n in refs)
    disk = archs.saved_keys(folder)
    layout = archs.CheckpointLayout(model)
    for name, ref in refs.items():
        key = layout.weight_key(ref)
        assert key in disk and torch.equal(disk[key], state[ref.param][ref.index] if ref.index else state[ref.param])
    assert set(disk) | set(fam.tied) == set(layout.reverted) | set(fam.tied)
    if fam.moe:
        assert not any(t.dim() == 3 for t in disk.values())  # experts are stored one by one
        # the router is not an nn.Linear (nor a Conv1D)
        assert not any(n.endswith(f".{fam.router}") or f".{fam.router}." in n for n in refs)
        experts = model.get_submodule(f"{fam.stack}.{fam.moe_blocks[0]}.{fam.experts}")
        count = experts.gate_up_proj.shape[0]
        assert len([n for n in refs if ".experts." in n]) == 3 * count * len(fam.moe_blocks)
        windows = archs.token_windows(SAMPLES, SEQ_LEN)
        for b in fam.moe_blocks:
            _, indices = archs.routing(model, fam, windows, b)
            counts = archs.expert_counts(indices, count)
            fair = sum(counts) / count
            assert min(counts) > 0.3 * fair, f"block {b}: uneven routing {counts}"


# ---------------------------------------------------------------- prune + export, every family

@pytest.mark.parametrize("family", FAMILIES)
def test_hf_export_prunes_exactly_the_block_layers(family, dense, calib, tmp_path):
    folder, model = dense(family)
    fam = archs.FAMILIES[family]
    out = tmp_path / "hf"
    report = prune_cli(folder, calib, out, "--format", "hf", "--sparse-ratio", RATIO)
    refs = archs.expected_layers(model, fam.stack)
    rows = {r["name"]: r for r in report["layers"]}
    assert len(rows) == len(report["layers"]), "a layer was reported twice"
    assert sorted(rows) == sorted(refs)

    dense_state = model.state_dict()
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    state = pruned.state_dict()
    for name, row in rows.items():
        weight = refs[name].weight(state)
        assert tuple(row["shape"]) == tuple(weight.shape), name  # [out, in], also for Conv1D and experts
        check_zero_counts(weight, row, RATIO, name)
    check_only_layers_changed(dense_state, state, [refs[n] for n in rows])
    for key in fam.tied:  # e.g. GPT-2's lm_head / wte: never pruned (nor is anything outside the stack)
        assert torch.equal(state[key], dense_state[key]), key
    assert torch.isfinite(archs.logits(pruned, archs.token_windows(2, SEQ_LEN, seed=5))).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_atlas_export_marks_the_pruned_tensors(family, dense, calib, tmp_path):
    folder, model = dense(family)
    fam = archs.FAMILIES[family]
    out = tmp_path / "atlas"
    report = prune_cli(folder, calib, out, "--format", "atlas", "--sparse-ratio", RATIO)
    refs = archs.expected_layers(model, fam.stack)
    rows = {r["name"]: r for r in report["layers"]}
    assert sorted(rows) == sorted(refs)

    layout = archs.CheckpointLayout(model)
    weight_keys = {layout.weight_key(refs[n]): n for n in rows}
    bias_keys = {layout.key_of(refs[n].bias) for n in rows if refs[n].bias}
    tensors = load_file(out / "quant_model_weights.safetensors")
    disk = archs.saved_keys(folder)  # the dense model in the checkpoint layout
    assert set(disk) <= set(tensors), f"missing from the Atlas file: {sorted(set(disk) - set(tensors))[:5]}"
    assert set(tensors) - set(disk) <= set(fam.tied)  # at most the tied aliases save_pretrained leaves out

    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc["version"] == "1.0.0" and desc["model_quant_type"] == "W16A16S"
    assert set(desc) - HEADER == set(tensors)
    assert {k for k in tensors if desc[k] == "W16A16S"} == set(weight_keys) | bias_keys
    assert all(desc[k] == "FLOAT" for k in tensors if k not in weight_keys and k not in bias_keys)

    for key, tensor in tensors.items():
        assert not tensor.is_floating_point() or tensor.dtype == torch.float16, key
        if key in weight_keys:
            name = weight_keys[key]
            check_zero_counts(tensor, rows[name], RATIO, f"{name} ({key})")
        elif key in disk:
            assert torch.equal(tensor, disk[key].half()), f"{key} changed"


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_without_rounding_keeps_the_logits(family, dense, calib, tmp_path):
    """Every layer goes through the solver, which at ratio 0 returns its weight to float32 rounding."""
    folder, model = dense(family)
    out = tmp_path / "r0"
    report = prune_cli(folder, calib, out, "--format", "hf", "--sparse-ratio", 0, "--keep-bits", "none")
    fam = archs.FAMILIES[family]
    assert sorted(r["name"] for r in report["layers"]) == sorted(archs.expected_layers(model, fam.stack))
    ids = archs.token_windows(2, SEQ_LEN, seed=5)
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(archs.logits(pruned, ids), archs.logits(model, ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- mixture of experts, in Python

@pytest.mark.parametrize("family", archs.MOE_FAMILIES)
def test_moe_all_block_weights_pruned_to_the_ratio_and_expert_tokens_are_routed_tokens(family):
    fam = archs.FAMILIES[family]
    _, model = archs.build(family)
    original = copy.deepcopy(model)
    windows = archs.token_windows(SAMPLES, SEQ_LEN)
    rows = prune_model(model, windows, FloatSparseConfig(sparse_ratio=RATIO, keep_bits=None), progress=False)
    refs = archs.expected_layers(original, fam.stack)
    by_name = {r["name"]: r for r in rows}
    assert sorted(by_name) == sorted(refs)  # attention, dense MLPs, shared experts, every routed expert

    state, dense_state = model.state_dict(), original.state_dict()
    total = sum(ref.weight(state).numel() for ref in refs.values())
    want = sum(int(ref.weight(state).numel() * RATIO) for ref in refs.values())
    got = 0
    for name, ref in refs.items():
        w = ref.weight(state)
        assert archs.zeros(w) == int(w.numel() * RATIO), name  # exact without keep-bit rounding
        got += archs.zeros(w)
    assert got == want and abs(got / total - RATIO) <= len(refs) / total
    check_only_layers_changed(dense_state, state, list(refs.values()))  # routers, norms, embeddings unchanged

    # Each expert's tokens are the (token, expert) routings of its block, on the stream the block received:
    # the blocks before it pruned, itself still dense (its layers are pruned after its statistics).
    experts = original.get_submodule(f"{fam.stack}.{fam.moe_blocks[0]}.{fam.experts}").gate_up_proj.shape[0]
    for b in fam.moe_blocks:
        reference = copy.deepcopy(original)
        for j in range(b):
            block = f"{fam.stack}.{j}"
            reference.get_submodule(block).load_state_dict(model.get_submodule(block).state_dict())
        _, indices = archs.routing(reference, fam, windows, b)
        counts = archs.expert_counts(indices, experts)
        for i in range(experts):
            for role in ("gate_proj", "up_proj", "down_proj"):
                name = f"{fam.stack}.{b}.{fam.experts}.{i}.{role}"
                assert by_name[name]["tokens"] == counts[i], f"{name}: {by_name[name]['tokens']} != {counts[i]}"
        attn = [n for n in by_name if archs.block_of(n, fam.stack) == b and ".experts." not in n]
        assert attn and all(by_name[n]["tokens"] == SAMPLES * SEQ_LEN for n in attn)


class Recorder:
    """A make_pruner stand-in: records the weight it was given and every input; prunes nothing."""

    def __init__(self, name, layer):
        self.name, self.weight, self.inputs, self.freed = name, layer.weight.detach().clone(), [], False

    def add_batch(self, inp):
        self.inputs.append(inp.detach().reshape(-1, inp.shape[-1]).clone())

    def fasterprune(self, ratio):
        return {"sparsity": 0.0, "relative_error": 0.0, "seconds": 0.0}

    def free(self):
        self.freed = True


@pytest.mark.parametrize("family", archs.MOE_FAMILIES)
def test_expert_statistics_are_the_tokens_routed_to_the_expert(family):
    """On the first MoE block (nothing before it pruned): expert i's gate/up inputs are the hidden states
    of the tokens the router sent to i, its down_proj inputs act(x Wg^T) * (x Wu^T) of those."""
    fam = archs.FAMILIES[family]
    _, model = archs.build(family)
    b = fam.moe_blocks[0]
    prefix = f"{fam.stack}.{b}.{fam.experts}"
    windows = archs.token_windows(SAMPLES, SEQ_LEN)
    dense_state = copy.deepcopy(model.state_dict())
    recorders = {}

    def factory(name, layer):
        recorders[name] = Recorder(name, layer)
        return recorders[name]

    rows = prune_model(model, windows, FloatSparseConfig(sparse_ratio=RATIO, include=[f"{prefix}.*"]),
                       make_pruner=factory, progress=False)
    refs = {n: r for n, r in archs.expected_layers(model, fam.stack).items() if n.startswith(prefix + ".")}
    assert sorted(recorders) == sorted(refs) == sorted(r["name"] for r in rows)
    assert all(r.freed for r in recorders.values())
    assert all(torch.equal(v, dense_state[k]) for k, v in model.state_dict().items())  # the router untouched

    hidden, indices = archs.routing(model, fam, windows, b)
    experts = model.get_submodule(prefix)
    for i in range(experts.gate_up_proj.shape[0]):
        x = torch.cat([h[(idx == i).any(-1)] for h, idx in zip(hidden, indices)])
        gate = refs[f"{prefix}.{i}.gate_proj"].weight(dense_state)
        up = refs[f"{prefix}.{i}.up_proj"].weight(dense_state)
        want = {"gate_proj": x, "up_proj": x, "down_proj": experts.act_fn(x @ gate.T) * (x @ up.T)}
        for role, expected in want.items():
            name = f"{prefix}.{i}.{role}"
            rec = recorders[name]
            assert torch.equal(rec.weight, refs[name].weight(dense_state)), f"{name}: not its [out, in] weight"
            archs.rows_equal_as_sets(torch.cat(rec.inputs), expected, name)


# ---------------------------------------------------------------- which block stack

def test_multimodal_model_prunes_the_language_model_stack():
    """The vision tower's layer list is the largest ModuleList, but text calibration prunes the decoder."""
    _, model = archs.build_multimodal()
    original = copy.deepcopy(model.state_dict())
    refs = archs.expected_layers(model, archs.MULTIMODAL_STACK)
    rows = prune_model(model, archs.token_windows(4, SEQ_LEN), FloatSparseConfig(sparse_ratio=RATIO),
                       make_pruner=Recorder, progress=False)
    assert sorted(r["name"] for r in rows) == sorted(refs)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_cli_picks_the_language_model_stack_and_blocks_names_it(workdir, calib, tmp_path):
    """Without --blocks the CLI prunes the language model's decoder; --blocks NAME selects a stack by name;
    a NAME that is not a candidate exits 2, naming the candidates, and writes nothing."""
    folder = archs.save_multimodal(workdir / "dense-multimodal")
    _, model = archs.build_multimodal()
    refs = archs.expected_layers(model, archs.MULTIMODAL_STACK)

    for flags in ([], ["--blocks", archs.MULTIMODAL_STACK]):
        out = tmp_path / f"hf{len(flags)}"
        report = prune_cli(folder, calib, out, "--format", "hf", "--sparse-ratio", RATIO, *flags)
        rows = {r["name"]: r for r in report["layers"]}
        assert sorted(rows) == sorted(refs), flags
        pruned = AutoModelForCausalLM.from_pretrained(out).eval()
        state = pruned.state_dict()
        for name, row in rows.items():
            check_zero_counts(refs[name].weight(state), row, RATIO, name)
        check_only_layers_changed(model.state_dict(), state, [refs[n] for n in rows])  # the vision tower too

    bad = tmp_path / "bad"
    rc, _, err = run_cli("prune", "--model", folder, "--calib", calib, "--out", bad, "--format", "hf",
                         "--num-samples", SAMPLES, "--seq-len", SEQ_LEN, "--eval-windows", 0, "--device", "cpu",
                         "--no-progress", "--blocks", "model.no_such.layers")
    assert rc == 2 and not bad.exists()
    assert "model.no_such.layers" in err
    assert archs.MULTIMODAL_STACK in err and archs.VISION_STACK in err, err


# ---------------------------------------------------------------- tied weights

class MagnitudePruner:
    """A make_pruner stand-in that prunes by magnitude and counts how often each weight storage is pruned."""

    pruned: dict[int, int] = {}

    def __init__(self, name, layer):
        self.layer = layer

    def add_batch(self, inp):
        pass

    def fasterprune(self, ratio):
        w = self.layer.weight
        k = int(w.numel() * ratio)
        w.data.view(-1)[w.detach().abs().flatten().argsort(stable=True)[:k]] = 0
        key = w.data_ptr()
        MagnitudePruner.pruned[key] = MagnitudePruner.pruned.get(key, 0) + 1
        return {"sparsity": archs.zeros(w) / w.numel(), "relative_error": 0.0, "seconds": 0.0}

    def free(self):
        pass


def test_a_shared_weight_is_never_pruned_twice():
    model = archs.TiedModel()
    out_weight = model.out.weight.detach().clone()
    MagnitudePruner.pruned = {}
    rows = prune_model(model, archs.token_windows(4, 16), FloatSparseConfig(sparse_ratio=RATIO),
                       make_pruner=MagnitudePruner, progress=False)
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names))
    assert all(n <= 1 for n in MagnitudePruner.pruned.values()), "a shared weight was pruned twice"
    blocks = model.blocks
    # still shared after pruning
    assert blocks[0].b.weight is blocks[0].a.weight and blocks[2].c.weight is blocks[1].c.weight
    assert blocks[0].c.weight is model.out.weight
    # a weight shared with a module outside the stack (like an lm_head tied to the embeddings) is left alone
    assert "blocks.0.c" not in names and torch.equal(model.out.weight, out_weight)
    # a weight shared by two selected layers is reported (and pruned) at most once
    assert len({"blocks.0.a", "blocks.0.b"} & set(names)) <= 1
    assert len({"blocks.1.c", "blocks.2.c"} & set(names)) <= 1
    # the weights nobody shares are pruned as usual
    for name in ("blocks.1.a", "blocks.1.b", "blocks.2.a", "blocks.2.b"):
        assert name in names, name
        weight = model.get_submodule(name).weight
        assert archs.zeros(weight) == int(weight.numel() * RATIO), name
