"""Dense targets (config.dense_targets): each layer fitted to the dense model's output on the dense model's inputs,
through the cross statistic X_prunedᵀ X_dense; exactly today's solve when the two streams are equal."""
import copy

import pytest
import torch
from torch import nn

from admm_sparse.config import ConfigError, FloatSparseConfig
from admm_sparse.layer import DENSE_TARGET_DAMPING, AdmmPruner
from admm_sparse.pipeline import prune_model
from archs import build
from test_pipeline import tiny_model, token_windows
from test_targets import Separate


def streams(tokens=256, d_in=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(tokens, d_in, generator=g) * torch.linspace(0.5, 2, d_in)
    pruned = dense + 0.3 * torch.randn(tokens, d_in, generator=g)  # the pruned model's drifted inputs
    return dense, pruned


def layer(d_out=16, d_in=24, seed=1):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=False)


def test_target_is_the_damped_least_squares_fit_of_the_dense_output():
    dense, pruned = streams()
    lin = layer()
    pruner = AdmmPruner(lin)
    pruner.add_batch(pruned)
    pruner.add_cross(pruned, dense)
    w = lin.weight.detach()
    target = pruner.dense_target(w)
    h, c, wd = pruned.double().T @ pruned.double(), pruned.double().T @ dense.double(), w.double()
    d = torch.diag(DENSE_TARGET_DAMPING * h.diagonal())
    expected = (wd @ c.T + wd @ d) @ torch.linalg.inv(h + d)  # a ridge toward W itself
    torch.testing.assert_close(target.double(), expected, rtol=1e-4, atol=1e-5)
    want = dense @ w.T
    best = torch.linalg.lstsq(pruned.double(), want.double()).solution.T.float()  # undamped least squares
    fit = (pruned @ target.T - want).norm()
    assert (pruned @ best.T - want).norm() <= fit <= 1.01 * (pruned @ best.T - want).norm()
    assert fit < 0.95 * (pruned @ w.T - want).norm()  # the weight itself fits the dense output worse
    pruner.dense_blend = 0.5
    torch.testing.assert_close(pruner.dense_target(w), (w + target) / 2, rtol=1e-5, atol=1e-6)


def test_equal_streams_give_exactly_todays_solve():
    dense, _ = streams()
    with_cross, plain = layer(), layer()
    a, b = AdmmPruner(with_cross, keep_bits=None), AdmmPruner(plain, keep_bits=None)
    a.add_batch(dense)
    a.add_cross(dense, dense)
    b.add_batch(dense)
    assert torch.equal(a.dense_target(with_cross.weight.detach()), with_cross.weight.detach())
    a.fasterprune(0.5)
    b.fasterprune(0.5)
    assert torch.equal(with_cross.weight, plain.weight)


def test_mismatched_token_counts_are_refused():
    dense, pruned = streams()
    pruner = AdmmPruner(layer())
    with pytest.raises(ValueError, match="same tokens"):
        pruner.add_cross(pruned, dense[:-1])


class Recorder(AdmmPruner):
    seen: dict = {}

    def fasterprune(self, *args, **kwargs):
        Recorder.seen[self.name] = (self.H.clone(), None if self.cross is None else self.cross.clone())
        return super().fasterprune(*args, **kwargs)


def recording(name, target):
    pruner = Recorder(target, keep_bits=None)
    pruner.name = name
    return pruner


def layer_inputs(model, windows, name):
    module, seen = model.get_submodule(name), []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for w in windows.split(1):
            model(input_ids=w)
    handle.remove()
    return torch.cat(seen)


def test_the_pipeline_feeds_the_dense_models_inputs_and_block_0_is_unchanged():
    model = tiny_model(layers=2)
    dense_model, plain = copy.deepcopy(model), copy.deepcopy(model)
    windows = token_windows(6, 32)
    Recorder.seen = {}
    prune_model(model, windows, FloatSparseConfig(0.5, keep_bits=None, dense_targets=1.0), make_pruner=recording,
                progress=False)
    prune_model(plain, windows, FloatSparseConfig(0.5, keep_bits=None), progress=False)
    for name, weight in model.named_parameters():
        same = torch.equal(weight, plain.get_parameter(name))
        assert same == (not name.startswith("model.layers.1.") or "norm" in name), name  # block 0: equal streams
    # block 1's q_proj: X_prunedᵀ X_dense over the same tokens, X_pruned from the pruned block 0
    name = "model.layers.1.self_attn.q_proj"
    x_pruned, x_dense = layer_inputs(model, windows, name), layer_inputs(dense_model, windows, name)
    h, cross = Recorder.seen[name]
    torch.testing.assert_close(cross, x_pruned.T @ x_dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.tril(), (x_pruned.T @ x_pruned).tril(), rtol=1e-4, atol=1e-4)
    assert Recorder.seen["model.layers.1.self_attn.k_proj"][1] is not None  # shared with q/k/v's leader


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj",
                                  "model.layers.1.mlp.up_proj"])
def test_sequential_groups_fit_their_own_layers_dense_inputs(name):
    """With sequential groups, each layer's cross statistic pairs its input with the groups before it pruned
    (the final model's input: no later group changes it) and the dense model's input to the same layer."""
    model = tiny_model(layers=2)
    dense_model = copy.deepcopy(model)
    windows = token_windows(6, 32)
    Recorder.seen = {}
    prune_model(model, windows, FloatSparseConfig(0.5, keep_bits=None, dense_targets=1.0, sequential=True),
                make_pruner=recording, progress=False)
    x_pruned, x_dense = layer_inputs(model, windows, name), layer_inputs(dense_model, windows, name)
    assert not torch.allclose(x_pruned, x_dense)
    h, cross = Recorder.seen[name]
    torch.testing.assert_close(cross, x_pruned.T @ x_dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.tril(), (x_pruned.T @ x_pruned).tril(), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:only .* calibration tokens")
def test_experts_keep_their_own_targets_and_sequential_combines():
    model = build("mixtral")[1]
    windows = token_windows(8, 32) % 120
    Recorder.seen = {}
    rows = prune_model(model, windows, FloatSparseConfig(0.5, keep_bits=None, dense_targets=1.0, sequential=True),
                       make_pruner=recording, progress=False)
    assert all(abs(r["sparsity"] - 0.5) < 0.01 for r in rows)
    experts = [n for n in Recorder.seen if ".experts." in n]
    assert experts and all(Recorder.seen[n][1] is None for n in experts)
    assert Recorder.seen["model.layers.1.self_attn.o_proj"][1] is not None


def test_option_is_checked():
    with pytest.raises(ConfigError, match="dense_targets: expected a number from 0 to 1"):
        FloatSparseConfig(dense_targets=1.5)
    assert FloatSparseConfig(dense_targets=0.5).loop_options()["dense_targets"] == 0.5


def test_a_pruner_without_cross_statistics_is_refused():
    model = tiny_model(layers=1)
    with pytest.raises(ValueError, match="dense targets need a pruner with add_cross"):
        prune_model(model, token_windows(2, 16), FloatSparseConfig(0.5, dense_targets=1.0),
                    make_pruner=lambda n, t: Separate(t), progress=False)  # the ADMM pruner behind a plain wrapper
