"""Block-by-block pruning of whole models, on tiny randomly initialised models of several families."""
import copy

import pytest
import torch
from torch import nn
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GemmaConfig, LlamaConfig, MistralConfig, OPTConfig,
                          Qwen2Config)

from admm_sparse.config import FloatSparseConfig
from admm_sparse.pipeline import prune_model
from admm_sparse.plan import candidate_modules, find_block_stack, make_plan
from admm_sparse.report import format_table, summarize

VOCAB = 300
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256)
CONFIGS = {
    "llama": lambda n: LlamaConfig(num_hidden_layers=n, **_COMMON),
    "qwen2": lambda n: Qwen2Config(num_hidden_layers=n, **_COMMON),
    "mistral": lambda n: MistralConfig(num_hidden_layers=n, **_COMMON),
    "gemma": lambda n: GemmaConfig(num_hidden_layers=n, head_dim=8, **_COMMON),
    # Sliding-window and global blocks alternate: each gets its own mask (windows of 32 > the window of 8).
    "gemma3": lambda n: Gemma3TextConfig(num_hidden_layers=n, head_dim=8, sliding_window=8,
                                         layer_types=(["sliding_attention", "full_attention"] * n)[:n], **_COMMON),
    "opt": lambda n: OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=n,
                               max_position_embeddings=256, word_embed_proj_dim=32),
}



def tiny_model(family="llama", layers=2, seed=0):
    """A randomly initialised causal LM of a few blocks: seconds to prune, no download."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[family](layers)).eval()


def token_windows(n=8, length=32, seed=1):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def magnitude_prune(weight, ratio):
    k = int(weight.numel() * ratio)
    weight.data.view(-1)[weight.detach().abs().flatten().argsort(stable=True)[:k]] = 0


class Recorder:
    """A stand-in pruner (the make_pruner contract): records its inputs, prunes by magnitude."""

    def __init__(self, layer):
        self.layer, self.inputs, self.freed = layer, [], False

    def add_batch(self, inp):
        self.inputs.append(inp.clone())

    def fasterprune(self, ratio):
        magnitude_prune(self.layer.weight, ratio)
        return {"sparsity": (self.layer.weight == 0).float().mean().item(), "relative_error": 0.0, "seconds": 0.0}

    def free(self):
        self.freed = True


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_blocks_see_the_outputs_of_the_pruned_blocks_before_them(family):
    """Each block's layers get exactly what the full model feeds them when the earlier blocks are pruned."""
    model = tiny_model(family, layers=3)
    original = copy.deepcopy(model)
    stack_name, blocks = find_block_stack(model)
    assert len(blocks) == 3 and stack_name.endswith("layers")
    ids = token_windows()
    pruners = {}

    def factory(name, layer):
        pruners[name] = Recorder(layer)
        return pruners[name]

    rows = prune_model(model, ids, FloatSparseConfig(0.5), make_pruner=factory, batch_size=3, progress=False)
    assert [r["name"] for r in rows] == list(pruners) == [n for n, _ in candidate_modules(model)
                                                          if n in linear_names(model)]
    assert all(p.freed for p in pruners.values()) and all(len(p.inputs) == 3 for p in pruners.values())

    for i in range(3):
        reference = copy.deepcopy(original)
        for name in pruners:
            if int(name[len(stack_name) + 1:].split(".")[0]) < i:
                magnitude_prune(reference.get_submodule(name).weight, 0.5)
        seen = {}
        for name in pruners:
            if name.startswith(f"{stack_name}.{i}."):
                reference.get_submodule(name).register_forward_hook(
                    lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0]))
        with torch.no_grad():
            for batch in ids.split(3):
                reference(input_ids=batch, use_cache=False)
        assert seen
        for name, inputs in seen.items():
            for got, want in zip(pruners[name].inputs, inputs):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    # The pruned model still runs and the output head was never a candidate.
    assert "lm_head" not in pruners
    model(input_ids=ids[:1])


def test_admm_exact_zero_counts_and_untouched_excluded_layers():
    model = tiny_model(layers=2)
    original = copy.deepcopy(model)
    config = FloatSparseConfig(0.3, ["*"], ["*self_attn*"])
    rows = prune_model(model, token_windows(16, 64), config, progress=False)
    assert [r["name"] for r in rows] == [f"model.layers.{i}.mlp.{p}" for i in range(2)
                                         for p in ("gate_proj", "up_proj", "down_proj")]
    for row in rows:
        weight = model.get_submodule(row["name"]).weight
        assert int((weight == 0).sum()) == int(weight.numel() * 0.3), row["name"]
        assert row["shape"] == tuple(weight.shape) and row["tokens"] == 16 * 64
        assert 0 < row["relative_error"] < 1 and row["seconds"] >= 0 and row["damping"] > 0
    changed = {row["name"] for row in rows}
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[0] not in changed:
            assert torch.equal(tensor, original.state_dict()[name]), name
    summary = summarize(rows)
    assert summary["layers"] == 6 and abs(summary["sparsity"] - 0.3) < 1e-3
    table = format_table(rows)
    assert "model.layers.1.mlp.down_proj" in table and "6 layers" in table


def test_later_blocks_without_selected_layers_are_not_run():
    model = tiny_model(layers=3)
    calls = []
    model.model.layers[2].register_forward_pre_hook(lambda *a: calls.append(1))
    rows = prune_model(model, token_windows(), FloatSparseConfig(0.5, ["model.layers.0.*"]),
                       make_pruner=lambda n, l: Recorder(l), progress=False)
    assert len(rows) == 7 and not calls


def test_nothing_selected_returns_no_rows_and_warns():
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="nothing_like_this"):
        assert prune_model(model, token_windows(), FloatSparseConfig(0.5, ["nothing_like_this"]),
                           progress=False) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_model_without_block_stack_is_pruned_in_one_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, VOCAB))
    model.train()
    assert find_block_stack(model) is None
    pruners = {}
    rows = prune_model(model, token_windows(), FloatSparseConfig(0.5),
                       make_pruner=lambda n, l: pruners.setdefault(n, Recorder(l)), batch_size=4, progress=False)
    assert [r["name"] for r in rows] == ["1", "3"]
    assert [len(p.inputs) for p in pruners.values()] == [2, 2]
    assert model.training  # restored


def test_output_embedding_is_never_a_candidate_without_a_stack():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.head = nn.Linear(8, 4)

        def get_output_embeddings(self):
            return self.head

    assert list(make_plan(Flat(), FloatSparseConfig()).targets) == ["body"]


def test_explicit_device_and_pruner_options_round_trip():
    model = tiny_model()
    rows = prune_model(model, list(token_windows(4, 64).split(2)), FloatSparseConfig(0.5, ["*mlp*"]),
                       device="cpu", progress=False)
    assert len(rows) == 6 and all(r["sparsity"] >= 0.5 for r in rows)
    assert next(model.parameters()).device.type == "cpu"


def test_config_options_reach_the_pruner():
    model = tiny_model()
    rows = prune_model(model, token_windows(4, 64), FloatSparseConfig(0.5, ["*mlp*"], mask_structure="per_row"),
                       progress=False)
    assert len(rows) == 6 and all(r["mask_structure"] == "per_row" for r in rows)
    for name in (r["name"] for r in rows):
        w = model.get_submodule(name).weight
        assert ((w == 0).sum(1) == int(w.shape[1] * 0.5)).all(), name  # every row pruned alike


class PlainBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(16, 16)
        self.unused = nn.Linear(16, 16)  # like an MoE expert that no calibration token reaches

    def forward(self, h):
        return h + torch.relu(self.used(h))


class PlainModel(nn.Module):
    """Not a Hugging Face model: forward(tokens), blocks called with the hidden state alone."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.blocks = nn.ModuleList([PlainBlock(), PlainBlock()])

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return h


def test_plain_block_stack_and_layers_without_input_left_dense():
    torch.manual_seed(0)
    model = PlainModel()
    unused = model.blocks[1].unused.weight.clone()
    with pytest.warns(UserWarning, match=r"unused.*left dense"):
        rows = prune_model(model, token_windows(), FloatSparseConfig(0.5),
                           make_pruner=lambda n, l: Recorder(l), progress=False)
    assert [r["name"] for r in rows] == ["blocks.0.used", "blocks.1.used"]
    assert torch.equal(model.blocks[1].unused.weight, unused)
