"""Sequential pruning inside a block (config.sequential): groups found from the block's data flow, each group's
statistics taken with the groups before it already pruned."""
import copy

import pytest
import torch

import admm_sparse
from admm_sparse.config import FloatSparseConfig
from admm_sparse.feed import data_flow_groups
from admm_sparse.pipeline import prune_model
from admm_sparse.plan import make_plan
from archs import build
from test_pipeline import tiny_model, token_windows


class StatsRecorder(admm_sparse.AdmmPruner):
    """The ADMM pruner, keeping a copy of the statistics each layer is pruned with."""
    seen: dict = {}

    def fasterprune(self, *args, **kwargs):
        StatsRecorder.seen[self.name] = self.H.clone()
        return super().fasterprune(*args, **kwargs)


def recording(name, target):
    pruner = StatsRecorder(target, keep_bits=None)
    pruner.name = name
    return pruner


@pytest.mark.parametrize("family,expected", [
    ("llama", [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
    ("gpt2", [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]),
])
def test_groups_follow_the_data_flow(family, expected):
    model = tiny_model() if family == "llama" else build(family)[1]
    plan = make_plan(model, FloatSparseConfig(0.5))
    stack, blocks = plan.stack
    targets = [t for n, t in plan.targets.items() if n.startswith(f"{stack}.0.")]
    captured = []
    handle = blocks[0].register_forward_pre_hook(lambda m, args, kwargs: captured.append((args, kwargs)),
                                                 with_kwargs=True)
    with torch.no_grad():
        model(input_ids=token_windows(1, 8) % 120)
    handle.remove()
    (args, kwargs), = captured
    hidden, extras = args[0], (args[1:], {**kwargs, "use_cache": False})
    with torch.no_grad():
        groups = data_flow_groups(blocks[0], targets, hidden, extras)
    names = [[t.name.removeprefix(f"{stack}.0.").removeprefix("self_attn.").removeprefix("mlp.")
              if family == "llama" else t.name.removeprefix(f"{stack}.0.") for t in g] for g in groups]
    assert names == expected


def test_each_group_is_calibrated_on_the_pruned_groups_before_it():
    model = tiny_model(layers=2)
    windows = token_windows(6, 32)
    StatsRecorder.seen = {}
    prune_model(model, windows, FloatSparseConfig(0.5, keep_bits=None, sequential=True), make_pruner=recording,
                progress=False)
    sequential = dict(StatsRecorder.seen)
    # block 0's inputs are the embeddings; the pruned model's o_proj and down_proj inputs there come from its
    # pruned q/k/v and gate/up: exactly what the sequential statistics must have seen
    for layer, reads in (("self_attn.o_proj", "o_proj"), ("mlp.down_proj", "down_proj")):
        module = model.get_submodule(f"model.layers.0.{layer}")
        inputs = []
        handle = module.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
        with torch.no_grad():
            for w in windows.split(1):
                model(input_ids=w)
        handle.remove()
        reference = admm_sparse.AdmmPruner(module)
        for x in inputs:
            reference.add_batch(x)
        torch.testing.assert_close(sequential[f"model.layers.0.{layer}"].tril(), reference.H.tril(),
                                   rtol=1e-5, atol=1e-6)
    # one pass (the default) calibrates o_proj on the dense q/k/v's outputs instead
    dense = tiny_model(layers=2)
    StatsRecorder.seen = {}
    prune_model(dense, windows, FloatSparseConfig(0.5, keep_bits=None), make_pruner=recording, progress=False)
    assert not torch.allclose(StatsRecorder.seen["model.layers.0.self_attn.o_proj"],
                              sequential["model.layers.0.self_attn.o_proj"])
    torch.testing.assert_close(StatsRecorder.seen["model.layers.0.self_attn.q_proj"],
                               sequential["model.layers.0.self_attn.q_proj"], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:only .* calibration tokens")
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_experts_and_routers_prune_sequentially(family):
    """Fused experts run inside one module: one group; every selected layer still pruned to its ratio."""
    model = build(family)[1]
    one_pass = copy.deepcopy(model)
    windows = token_windows(8, 32) % 120
    rows = prune_model(model, windows, FloatSparseConfig(0.5, keep_bits=None, sequential=True), progress=False)
    reference = prune_model(one_pass, windows, FloatSparseConfig(0.5, keep_bits=None), progress=False)
    assert [r["name"] for r in rows] == [r["name"] for r in reference]
    assert all(abs(r["sparsity"] - 0.5) < 0.01 for r in rows)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=windows[:1]).logits).all()
