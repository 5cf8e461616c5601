"""Prunable layers beyond nn.Linear (admm_sparse.targets) and how the pipeline finds, feeds and writes them."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MixtralConfig
from transformers.integrations.moe import use_experts_implementation

import admm_sparse
from admm_sparse.config import FloatSparseConfig
from admm_sparse.pipeline import prune_model
from admm_sparse.plan import find_block_stack, make_plan
from admm_sparse.targets import feeding, find_targets

VOCAB = 128


def windows(n=8, length=32, seed=1):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- fused experts, every layout

class _Config:
    _experts_implementation = "batched_mm"  # transformers' generic implementation, driven by the layout flags


def experts_class(concatenated: bool, transposed: bool, bias: bool, gate: bool = True):
    class Experts(nn.Module):
        def __init__(self, config, experts=3, hidden=8, inter=6):
            super().__init__()
            first = 2 * inter if gate else inter
            shape = (experts, hidden, first) if transposed else (experts, first, hidden)
            down = (experts, inter, hidden) if transposed else (experts, hidden, inter)
            setattr(self, "gate_up_proj" if gate else "up_proj", nn.Parameter(torch.randn(shape)))
            self.down_proj = nn.Parameter(torch.randn(down))
            if bias:
                setattr(self, "gate_up_proj_bias" if gate else "up_proj_bias", nn.Parameter(torch.randn(experts, first)))
                self.down_proj_bias = nn.Parameter(torch.randn(experts, hidden))
            self.act_fn = nn.SiLU()
            self.num_experts = experts

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("the batched_mm implementation runs instead")

    return use_experts_implementation(Experts, is_concatenated=concatenated, is_transposed=transposed, has_bias=bias,
                                      has_gate=gate)


LAYOUTS = [(True, False, False, True), (False, True, True, True), (True, True, False, True), (True, False, True, False)]


@pytest.mark.parametrize("concatenated,transposed,bias,gate", LAYOUTS)
def test_expert_slices_and_inputs_reproduce_the_experts_forward(concatenated, transposed, bias, gate):
    """Each expert's gate/up/down target, fed the inputs the hook captures, recomputes the module's output."""
    torch.manual_seed(0)
    experts = experts_class(concatenated, transposed, bias, gate)(_Config())
    targets = find_targets([("moe.experts", experts)])
    roles = ("gate_proj", "up_proj", "down_proj") if gate else ("up_proj", "down_proj")
    assert [t.name for t in targets] == [f"moe.experts.{e}.{r}" for e in range(3) for r in roles]
    assert all(t.shape == ((8, 6) if t.role == "down_proj" else (6, 8)) for t in targets)
    hidden = torch.randn(10, 8)
    top_k = torch.tensor([[0, 1], [1, 2], [0, 2], [1, 0], [0, 1], [2, 1], [1, 0], [0, 2], [1, 2], [0, 1]])
    weights = torch.rand(10, 2)
    seen = {}
    with feeding(targets, lambda t, x: seen.setdefault(t.name, []).append(x)):
        out = experts(hidden, top_k, weights)
    by = {t.name: t for t in targets}
    mine = torch.zeros_like(out)
    for e in range(3):
        rows = (top_k == e).any(-1).nonzero().squeeze(1)
        x = seen[f"moe.experts.{e}.up_proj"][0]
        assert torch.equal(x, hidden[rows])
        up = by[f"moe.experts.{e}.up_proj"]
        parts = [F.linear(x, up.weight, up.bias_view_of(experts.gate_up_proj_bias if gate else experts.up_proj_bias)
                          if bias else None)]
        if gate:
            g = by[f"moe.experts.{e}.gate_proj"]
            assert seen[g.name][0] is x  # gate and up read one tensor: their statistics are shared
            gate_out = F.linear(x, g.weight, g.bias_view_of(experts.gate_up_proj_bias) if bias else None)
            fused = torch.cat([gate_out, parts[0]], -1) if concatenated else \
                torch.stack([gate_out, parts[0]], -1).flatten(-2)
            inner = experts._apply_gate(fused)
        else:
            inner = experts.act_fn(parts[0])
        down = by[f"moe.experts.{e}.down_proj"]
        torch.testing.assert_close(seen[down.name][0], inner)
        y = F.linear(inner, down.weight, experts.down_proj_bias[e] if bias else None)
        w = weights[rows][(top_k[rows] == e)]
        mine.index_add_(0, rows, y * w[:, None])
    torch.testing.assert_close(mine, out, rtol=1e-5, atol=1e-5)


def test_writing_an_expert_target_changes_only_its_slice():
    torch.manual_seed(0)
    experts = experts_class(False, True, False)(_Config())
    before = experts.gate_up_proj.detach().clone()
    target = find_targets([("e", experts)])[3]  # expert 1's gate_proj
    assert (target.expert, target.role) == (1, "gate_proj")
    target.weight.copy_(torch.zeros(target.shape))
    changed = (experts.gate_up_proj != before).nonzero()
    assert changed[:, 0].unique().tolist() == [1] and (changed[:, 2] % 2 == 0).all()  # interleaved: even columns


# ---------------------------------------------------------------- MoE models

def tiny_mixtral(seed=0):
    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=VOCAB, num_local_experts=4, num_experts_per_tok=2)
    return AutoModelForCausalLM.from_config(config).eval()


def test_moe_block_is_pruned_to_the_ratio_and_routers_are_left_alone():
    model = tiny_mixtral()
    routers = {n: p.clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    the_plan = make_plan(model, FloatSparseConfig(0.5))
    assert the_plan.routers == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    rows = prune_model(model, windows(), FloatSparseConfig(0.5), progress=False)
    assert len(rows) == 2 * (4 + 4 * 3)
    assert sum(r["tokens"] for r in rows if r["name"].startswith("model.layers.0.mlp.experts.")
               and r["name"].endswith("up_proj")) == 8 * 32 * 2  # top-2: every token reaches two experts
    for i, block in enumerate(model.model.layers):
        weights = [p for n, p in block.named_parameters() if "norm" not in n and "mlp.gate." not in n]
        zeros = sum(int((p == 0).sum()) for p in weights)
        assert zeros == sum(p.numel() for p in weights) // 2, i
    assert all(torch.equal(p, routers[n]) for n, p in model.named_parameters() if n in routers)


def test_qwen2_moe_shared_expert_gate_is_a_router_and_its_shared_expert_a_layer():
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
                            shared_expert_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=VOCAB, num_experts=4, num_experts_per_tok=2)
    the_plan = make_plan(AutoModelForCausalLM.from_config(config), FloatSparseConfig(0.5))
    assert the_plan.routers == ["model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate"]
    assert "model.layers.0.mlp.shared_expert.down_proj" in the_plan.targets
    assert not any("gate." in n or n.endswith("_gate") for n in the_plan.targets)


class StatsRecorder(admm_sparse.AdmmPruner):
    """The ADMM pruner, keeping a copy of the statistics it prunes with."""
    seen: dict = {}

    def fasterprune(self, *args, **kwargs):
        StatsRecorder.seen[self.name] = (self.H.clone(), self.tokens)
        return super().fasterprune(*args, **kwargs)


def test_an_expert_no_token_reaches_is_pruned_with_all_tokens_as_prior(monkeypatch):
    model = tiny_mixtral()
    gate = model.model.layers[0].mlp.gate
    route = gate.forward

    def never_expert_3(hidden):
        logits, scores, index = route(hidden)
        return logits, scores, torch.where(index == 3, torch.where(index[:, :1] == 0, 1, 0), index)

    monkeypatch.setattr(gate, "forward", never_expert_3)
    inputs = []
    model.model.layers[0].mlp.experts.register_forward_hook(lambda m, args, out: inputs.append(args[0]))

    def factory(name, target):
        pruner = StatsRecorder(target)
        pruner.name = name
        return pruner

    config = FloatSparseConfig(0.5, ["model.layers.0.mlp.experts.*"])
    rows = {r["name"]: r for r in prune_model(model, windows(4), config, make_pruner=factory, progress=False)}
    gate_row, down_row = rows["model.layers.0.mlp.experts.3.gate_proj"], rows["model.layers.0.mlp.experts.3.down_proj"]
    assert gate_row["tokens"] == 0 and gate_row["prior_tokens"] == 32 and down_row["prior_tokens"] == 48
    assert gate_row["sparsity"] == 0.5 and "prior_tokens" not in rows["model.layers.0.mlp.experts.0.gate_proj"]
    x = torch.cat([h.reshape(-1, 32) for h in inputs[:4]])  # the routed pass; the prior pass repeats them
    hand = (x.T @ x) * (32 / x.shape[0])
    H, _ = StatsRecorder.seen["model.layers.0.mlp.experts.3.gate_proj"]
    torch.testing.assert_close(H.tril(), hand.tril(), rtol=1e-4, atol=1e-4)
    weight = model.model.layers[0].mlp.experts.gate_up_proj[3]
    assert int((weight == 0).sum()) == weight.numel() // 2


# ---------------------------------------------------------------- shared statistics

class Separate:
    """The ADMM pruner without share_statistics: every layer accumulates its own statistics."""

    def __init__(self, target):
        self.inner = admm_sparse.AdmmPruner(target)

    def add_batch(self, inp):
        self.inner.add_batch(inp)

    def fasterprune(self, ratio):
        return self.inner.fasterprune(ratio)

    def free(self):
        self.inner.free()


def test_shared_statistics_give_bitwise_the_same_model():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB)
    shared = AutoModelForCausalLM.from_config(config).eval()
    separate = copy.deepcopy(shared)
    accumulating = []

    class Counting(admm_sparse.AdmmPruner):
        def add_batch(self, inp):
            accumulating.append(self)
            super().add_batch(inp)

    prune_model(shared, windows(), FloatSparseConfig(0.5), make_pruner=lambda n, t: Counting(t), progress=False)
    # Per block, 4 inputs are read: q/k/v's, o's, gate/up's, down's; 7 layers share them.
    assert len({id(p) for p in accumulating}) == 2 * 4
    prune_model(separate, windows(), FloatSparseConfig(0.5), make_pruner=lambda n, t: Separate(t), progress=False)
    for (name, a), b in zip(shared.state_dict().items(), separate.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- Conv1D, tied weights, block stacks

def test_gpt2_conv1d_is_pruned_as_the_linear_of_its_transposed_weight():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                        n_positions=64)).eval()
    the_plan = make_plan(model, FloatSparseConfig(0.5))
    assert {t.kind for t in the_plan.targets.values()} == {"conv1d"}
    assert the_plan.targets["transformer.h.0.attn.c_attn"].shape == (96, 32)  # Conv1D weight is [32, 96]
    rows = prune_model(model, windows(), FloatSparseConfig(0.5), progress=False)
    assert len(rows) == 8
    for row in rows:
        weight = model.get_submodule(row["name"]).weight
        assert int((weight == 0).sum()) == weight.numel() // 2, row["name"]
    assert torch.isfinite(model(input_ids=windows(1)).logits).all()


class Block(nn.Module):
    def __init__(self, shared: nn.Linear | None = None):
        super().__init__()
        self.mix = shared or nn.Linear(16, 16)
        self.own = nn.Linear(16, 16)

    def forward(self, h):
        return h + torch.relu(self.own(self.mix(h)))


class Wrapper(nn.Module):
    """A big 'vision' stack beside a small language decoder, which get_decoder() names."""

    def __init__(self, share_with_embedding=False):
        super().__init__()
        self.vision = nn.ModuleList([nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 16)) for _ in range(4)])
        self.decoder = nn.Module()
        self.decoder.embed = nn.Embedding(VOCAB, 16)
        shared = nn.Linear(16, 16)
        self.decoder.layers = nn.ModuleList([Block(shared), Block(shared)])
        if share_with_embedding:
            self.decoder.layers[0].own.weight = nn.Parameter(torch.randn(16, 16))
            self.decoder.tied_head = nn.Linear(16, 16, bias=False)
            self.decoder.tied_head.weight = self.decoder.layers[0].own.weight

    def get_decoder(self):
        return self.decoder

    def forward(self, tokens):
        h = self.decoder.embed(tokens)
        for block in self.decoder.layers:
            h = block(h)
        return h


def test_the_decoder_stack_is_preferred_and_can_be_named():
    model = Wrapper()
    assert find_block_stack(model)[0] == "decoder.layers"
    assert find_block_stack(model, "vision")[0] == "vision"
    with pytest.raises(ValueError, match=r"'decoder.layer' is not.*candidates are: 'vision', 'decoder.layers'"):
        find_block_stack(model, "decoder.layer")


def test_tied_weights_are_pruned_once_and_never_through_a_module_left_dense():
    torch.manual_seed(0)
    model = Wrapper()
    with pytest.warns(UserWarning, match="decoder.layers.1.mix: its weight is decoder.layers.0.mix's"):
        rows = prune_model(model, windows(), FloatSparseConfig(0.5), progress=False)
    assert [r["name"] for r in rows] == ["decoder.layers.0.mix", "decoder.layers.0.own", "decoder.layers.1.own"]
    assert int((model.decoder.layers[1].mix.weight == 0).sum()) == 128  # pruned once, not twice

    model = Wrapper(share_with_embedding=True)
    head = model.decoder.tied_head.weight.detach().clone()
    with pytest.warns(UserWarning, match="decoder.layers.0.own: its weight is shared with decoder.tied_head.weight"):
        rows = prune_model(model, windows(), FloatSparseConfig(0.5), progress=False)
    assert "decoder.layers.0.own" not in [r["name"] for r in rows]
    assert torch.equal(model.decoder.tied_head.weight, head)
