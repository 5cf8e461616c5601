"""Block reconstruction (admm_sparse.reconstruct, config.reconstruct_epochs): masks fixed, the block's error to the
dense block lowered, never worse held out, off by default, one process, resumable."""
import copy
import dataclasses
import math

import pytest
import torch

import admm_sparse.pipeline as pipeline
from admm_sparse import allocation, fit, reconstruct
from admm_sparse.config import ConfigError, FloatSparseConfig, parse_config
from admm_sparse.distributed import Group
from admm_sparse.keepbits import apply_keepbits
from admm_sparse.pipeline import prune_blocks, prune_model
from admm_sparse.plan import make_plan
from admm_sparse.resume import ResumeState
from archs import build
from test_pipeline import VOCAB, PlainModel, Recorder, tiny_model, token_windows


def spy_on_reconstruction(monkeypatch):
    """Wrap the loop's reconstruct_block: record each block's pruned weights before and after it."""
    seen = []
    real = reconstruct.reconstruct_block

    def spy(block, targets, *args, **kwargs):
        before = {t.name: t.weight.detach().clone() for t in targets}
        report = real(block, targets, *args, **kwargs)
        seen.append((before, {t.name: t.weight.detach().clone() for t in targets}, report, kwargs["scalers"]))
        return report

    monkeypatch.setattr(pipeline, "reconstruct_block", spy)
    return seen


def interrupt_after_block(monkeypatch, block: int, run) -> None:
    """run() (a block loop with a ResumeState) stopped by a KeyboardInterrupt once the state after `block` is
    saved, as a killed run would be; ResumeState.save is itself again afterwards."""
    save = ResumeState.save

    def save_then_stop(self, next_block, *args):
        save(self, next_block, *args)
        if next_block == block + 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(ResumeState, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(ResumeState, "save", save)


@pytest.mark.filterwarnings("ignore:only .* calibration tokens")  # the tiny experts see few tokens
@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])  # Linears, transposed Conv1Ds, 3D expert slices
def test_zeros_stay_exactly_and_kept_weights_move(monkeypatch, family):
    seen = spy_on_reconstruction(monkeypatch)
    model = tiny_model(layers=3) if family == "llama" else build(family)[1]
    windows = token_windows(16, 32) % 120  # the archs models' vocabulary
    result = prune_blocks(model, windows, FloatSparseConfig(0.5, keep_bits=None, reconstruct_epochs=3),
                          progress=False)
    assert len(seen) == len(result.reconstruction) >= 2
    moved = 0
    for before, after, report, _ in seen:
        for name in before:
            assert torch.equal(before[name] == 0, after[name] == 0), name
            moved += not torch.equal(before[name], after[name])
        assert (report["best_epoch"] > 0) == (moved > 0)  # weights change exactly where a fit was kept
    assert moved > 0


def block0_relative_mse(model, dense, windows):
    """The first block's output error to the dense first block, on `windows` (both run on the same embeddings)."""
    with torch.no_grad():
        got = model(input_ids=windows, output_hidden_states=True).hidden_states[1]
        want = dense(input_ids=windows, output_hidden_states=True).hidden_states[1]
    return ((got - want).square().sum() / want.square().sum()).item()


@pytest.mark.parametrize("dtype", ["model", "bfloat16"])
def test_lowers_the_blocks_error_and_never_raises_the_held_out_one(dtype):
    dense = tiny_model(layers=2)
    calib = token_windows(16, 32)
    plain, fitted = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_model(plain, calib, FloatSparseConfig(0.6, keep_bits=None), progress=False)
    autocast = set()  # (grad enabled, autocast on) of o_proj's forwards: the fit's are the ones with grad
    hook = fitted.model.layers[0].self_attn.o_proj.register_forward_hook(
        lambda *_: autocast.add((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))))
    result = prune_blocks(fitted, calib, FloatSparseConfig(0.6, keep_bits=None, reconstruct_epochs=4,
                                                           reconstruct_dtype=dtype), progress=False)
    hook.remove()
    assert autocast == {(False, False), (True, dtype == "bfloat16")}  # the held-out error in the model's dtype
    assert [r["block"] for r in result.reconstruction] == ["model.layers.0", "model.layers.1"]
    for r in result.reconstruction:
        assert r["heldout_after"] <= r["heldout_before"] and set(r) == {
            "block", "fit_batches", "heldout_batches", "heldout_before", "heldout_after", "epochs", "best_epoch",
            "heldout_by_epoch", "seconds"}
        assert (r["fit_batches"], r["heldout_batches"]) == (14, 2) and 1 <= r["best_epoch"] <= r["epochs"] <= 4
        assert len(r["heldout_by_epoch"]) == r["epochs"] and r["heldout_by_epoch"][r["best_epoch"] - 1] == \
            r["heldout_after"] == min(r["heldout_by_epoch"])
    # Measured apart from the report: block 0 (same inputs in both streams) on all calibration windows.
    before, after = block0_relative_mse(plain, dense, calib), block0_relative_mse(fitted, dense, calib)
    assert after < 0.95 * before


def step_rates(monkeypatch) -> list:
    """The learning rate of every step fit.fit takes from now on (every epoch runs: the whole schedule is seen)."""
    rates = []
    real_step = fit.Weights.step

    def step(self):
        rates.append(self.optimizer.param_groups[0]["lr"])
        real_step(self)

    monkeypatch.setattr(fit.Weights, "step", step)
    monkeypatch.setattr(fit, "PATIENCE", 99)
    return rates


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_learning_rate_schedule(monkeypatch, schedule):
    """cosine: each step's rate is the first one times (1 + cos(pi s / S)) / 2, S = epochs x fitted batches, s the
    steps before it; constant: every step's rate is the first one (the layer's lr x RMS of its kept weights)."""
    rates = step_rates(monkeypatch)
    config = FloatSparseConfig(0.5, keep_bits=None, reconstruct_epochs=3, reconstruct_schedule=schedule,
                               include=["model.layers.0.*"])
    result = prune_blocks(tiny_model(layers=1), token_windows(16, 32), config, progress=False)
    total = 3 * result.reconstruction[0]["fit_batches"]
    assert len(rates) == total and rates[0] > 0
    factors = [0.5 * (1 + math.cos(math.pi * s / total)) if schedule == "cosine" else 1.0 for s in range(total)]
    assert rates == pytest.approx([rates[0] * f for f in factors], rel=1e-12)


def test_a_fit_that_only_gets_worse_is_dropped_bitwise():
    """A learning rate far too large: every epoch is worse held out, so each block keeps its pruned weights and
    the model is bitwise the one pruned without reconstruction."""
    dense = tiny_model(layers=2)
    plain, fitted = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_model(plain, token_windows(), FloatSparseConfig(0.5), progress=False)
    result = prune_blocks(fitted, token_windows(), FloatSparseConfig(0.5, reconstruct_epochs=5, reconstruct_lr=10.0),
                          progress=False)
    for r in result.reconstruction:
        assert r["best_epoch"] == 0 and r["epochs"] == fit.PATIENCE
        assert r["heldout_after"] == r["heldout_before"]
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in fitted.state_dict().items())


def test_off_by_default_runs_nothing_more(monkeypatch):
    """reconstruct_epochs=0 (the default): no reconstruction, no dense stream (no extra block forward), the same
    model as an explicit 0."""
    monkeypatch.setattr(pipeline, "reconstruct_block", lambda *a, **k: pytest.fail("reconstruction ran"))
    dense = tiny_model(layers=2)
    models = [copy.deepcopy(dense), copy.deepcopy(dense)]
    calls = []
    for block in models[0].model.layers:
        block.register_forward_pre_hook(lambda *a: calls.append(1))
    results = [prune_blocks(models[0], token_windows(), FloatSparseConfig(0.5), progress=False),
               prune_blocks(models[1], token_windows(), FloatSparseConfig(0.5, reconstruct_epochs=0), progress=False)]
    assert len(calls) == 8 * 3  # block 0: statistics + next inputs; block 1 (the last): statistics
    assert results[0].reconstruction == results[1].reconstruction == []
    assert all(torch.equal(v, models[1].state_dict()[k]) for k, v in models[0].state_dict().items())


def test_keep_bit_rounding_is_applied_again_after_the_fit(monkeypatch):
    seen = spy_on_reconstruction(monkeypatch)
    model = tiny_model(layers=2)
    result = prune_blocks(model, token_windows(16, 32), FloatSparseConfig(0.6, reconstruct_epochs=4,
                                                                          reconstruct_lr=1e-2), progress=False)
    assert any(r["best_epoch"] > 0 for r in result.reconstruction)
    for before, after, _, scalers in seen:
        for name, w in after.items():
            assert torch.equal(apply_keepbits(w, scalers[name], 2, 0.02), w), name  # on the keep-bit grid
            assert ((before[name] == 0) <= (w == 0)).all(), name  # zeros stay; rounding may flush a tiny one


def test_rounding_by_salience_is_the_grid_the_fit_works_on(monkeypatch):
    """salience_bits reaches the fit's rounding: every rounding it applies is by salience, and each pruned weight
    ends as one of those roundings (the kept epoch's), zeros kept."""
    seen = spy_on_reconstruction(monkeypatch)
    outputs = []

    def recording(w, scaler, *rounding):
        assert rounding[2] == 1.0, rounding
        out = apply_keepbits(w, scaler, *rounding)
        outputs.append(out.clone())
        return out

    monkeypatch.setattr(fit, "apply_keepbits", recording)
    model = tiny_model(layers=2)
    result = prune_blocks(model, token_windows(16, 32), FloatSparseConfig(0.6, reconstruct_epochs=4, salience_bits=1.0,
                                                                          reconstruct_lr=1e-2), progress=False)
    assert any(r["best_epoch"] > 0 for r in result.reconstruction) and outputs
    assert all(r["salience_bits"] == 1.0 and r["keep_proportion"] is None for r in result.rows)
    for before, after, _, _ in seen:
        for name, w in after.items():
            assert any(o.shape == w.shape and torch.equal(o, w) for o in outputs), name
            assert ((before[name] == 0) <= (w == 0)).all(), name


def test_the_fit_runs_on_the_keep_bit_grid(monkeypatch):
    """Straight-through: every forward of the fit sees the weights as delivered (rounded), not the masters."""
    seen = spy_on_reconstruction(monkeypatch)
    model = tiny_model(layers=1)
    q_proj = model.model.layers[0].self_attn.q_proj
    weights = []
    q_proj.register_forward_pre_hook(lambda m, args: weights.append(m.weight.detach().clone()))
    prune_blocks(model, token_windows(16, 32), FloatSparseConfig(0.6, reconstruct_epochs=3, reconstruct_lr=1e-2),
                 progress=False)
    (_, after, report, scalers), = seen
    pruned = [w for w in weights if (w == 0).any()]  # the forwards after pruning: the fit's and the measurements'
    assert len(pruned) > 16 * report["epochs"] and not all(torch.equal(w, pruned[0]) for w in pruned)
    for w in pruned:
        assert torch.equal(apply_keepbits(w, scalers["model.layers.0.self_attn.q_proj"], 2, 0.02), w)


def test_keep_bits_needs_a_pruner_with_a_scaler():
    with pytest.raises(ValueError, match=r"keep_bits=None"):
        prune_model(tiny_model(), token_windows(), FloatSparseConfig(0.5, reconstruct_epochs=1),
                    make_pruner=lambda n, t: Recorder(t), progress=False)
    torch.manual_seed(0)
    rows = prune_model(PlainModel(), token_windows(), FloatSparseConfig(0.5, keep_bits=None, reconstruct_epochs=1),
                       make_pruner=lambda n, t: Recorder(t), progress=False)  # any pruner without rounding
    assert len(rows) == 2


class TwoProcesses(Group):
    size = 2


def test_several_processes_one_window_and_no_block_stack_are_refused():
    config = FloatSparseConfig(0.5, reconstruct_epochs=1)
    with pytest.raises(ValueError, match="one process"):
        prune_blocks(tiny_model(), token_windows(), config, group=TwoProcesses(), progress=False)
    with pytest.raises(ValueError, match="at least 2 calibration batches"):
        prune_model(tiny_model(), token_windows(1), config, progress=False)
    flat = torch.nn.Sequential(torch.nn.Embedding(300, 16), torch.nn.Linear(16, 16))
    with pytest.raises(ValueError, match="needs a stack of blocks"):
        prune_model(flat, token_windows(), config, progress=False)


def test_refusals_come_before_the_allocations_probe_pass(monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("the probe pass ran before the refusal")

    monkeypatch.setattr(allocation, "ErrorProbe", no_probe)
    config = FloatSparseConfig(0.5, reconstruct_epochs=1, allocation="error")
    with pytest.raises(ValueError, match="one process"):
        prune_blocks(tiny_model(), token_windows(), config, group=TwoProcesses(), progress=False)
    with pytest.raises(ValueError, match="at least 2 calibration batches"):
        prune_model(tiny_model(), token_windows(1), config, progress=False)
    with pytest.raises(ValueError, match="each needs at least one"):
        prune_blocks(tiny_model(), token_windows(1), dataclasses.replace(config, reconstruct_epochs=0),
                     group=TwoProcesses(), progress=False)


def test_holdout_split():
    assert fit.holdout_split(2) == ([0], [1])
    assert fit.holdout_split(7) == ([0, 1, 2, 3, 4, 5], [6])
    fitted, held = fit.holdout_split(17)
    assert held == [7, 15] and len(fitted) == 15


def test_an_interrupted_run_resumes_to_the_same_blocks(tmp_path, monkeypatch):
    """The dense stream is saved with the pruned one: a resumed run fits the next blocks to the same targets."""
    dense = tiny_model(layers=3)
    config = FloatSparseConfig(0.5, reconstruct_epochs=2)
    whole = copy.deepcopy(dense)
    expected = prune_blocks(whole, token_windows(), config, progress=False)
    state = ResumeState(tmp_path, {"run": 1})
    interrupt_after_block(monkeypatch, 1, lambda: prune_blocks(copy.deepcopy(dense), token_windows(), config,
                                                               state=state, progress=False))
    resumed = copy.deepcopy(dense)
    result = prune_blocks(resumed, token_windows(), config, state=state, progress=False)
    block = "model.layers.2."
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in resumed.state_dict().items() if k.startswith(block))
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in res.reconstruction] for res in (expected, result)]
    assert strip[0] == strip[1] and len(strip[0]) == 3


# ---------------------------------------------------------------- options

def test_options_from_yaml_python_and_not_to_the_pruner():
    entry = {"type": "float_sparse", "reconstruct_epochs": 5, "reconstruct_lr": 0.01}
    config = parse_config({"spec": {"process": [entry]}})
    assert (config.reconstruct_epochs, config.reconstruct_lr) == (5, 0.01)
    assert parse_config({"spec": {"process": [{**entry, "reconstruct_dtype": "bfloat16"}]}}).reconstruct_dtype == \
        "bfloat16"
    assert config == FloatSparseConfig(reconstruct_epochs=5, reconstruct_lr=0.01)
    assert not any(k.startswith("reconstruct") for k in config.pruner_options())
    assert (FloatSparseConfig().reconstruct_epochs, FloatSparseConfig().reconstruct_lr) == (0, 3e-3)


@pytest.mark.parametrize("key,value", [("reconstruct_epochs", -1), ("reconstruct_epochs", 1.5),
                                       ("reconstruct_epochs", True), ("reconstruct_epochs", "2"),
                                       ("reconstruct_lr", 0), ("reconstruct_lr", -1e-3),
                                       ("reconstruct_lr", float("nan")), ("reconstruct_lr", float("inf")),
                                       ("reconstruct_lr", "0.01"),
                                       ("reconstruct_lr", True), ("reconstruct_dtype", "float16"),
                                       ("reconstruct_unit", "layer"), ("reconstruct_schedule", "linear")])
def test_bad_values_are_config_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        FloatSparseConfig(**{key: value})
    with pytest.raises(ConfigError, match=rf"^<config>: spec.process\[0\].{key}: "):
        parse_config({"spec": {"process": [{"type": "float_sparse", key: value}]}})


def test_a_block_whose_layers_got_no_input_is_not_fitted():
    torch.manual_seed(0)
    model = PlainModel()
    with pytest.warns(UserWarning, match="left dense"):
        result = prune_blocks(model, token_windows(), FloatSparseConfig(0.5, ["*unused"], keep_bits=None,
                                                                         reconstruct_epochs=2), progress=False)
    assert result.rows == [] and result.reconstruction == []


# ---------------------------------------------------------------- sub-blocks (reconstruct_unit "sub-block")

def first_block(model, windows):
    """Block 0 of a model, its selected targets, and its (hidden, (args, kwargs)) on the windows' first batch."""
    the_plan = make_plan(model, FloatSparseConfig())
    stack_name, blocks = the_plan.stack
    targets = [t for name, t in the_plan.targets.items() if name.startswith(f"{stack_name}.0.")]
    seen = []

    def record(module, args, kwargs):
        seen.append((args[0], (args[1:], kwargs)) if args else (kwargs["hidden_states"], (
            (), {k: v for k, v in kwargs.items() if k != "hidden_states"})))

    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=windows[:2], use_cache=False)
    handle.remove()
    return blocks[0], targets, seen[0]


def gptj():
    """A tiny GPT-J: attention and MLP in parallel on one normalised input (no residual point between them)."""
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    return GPTJForCausalLM(GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=8,
                                      n_positions=64, bos_token_id=1, eos_token_id=2)).eval()


@pytest.mark.filterwarnings("ignore:only .* calibration tokens")
@pytest.mark.parametrize("family,split,mlp", [
    ("llama", "post_attention_layernorm", {"gate_proj", "up_proj", "down_proj"}),
    ("gpt2", "ln_2", {"c_fc", "c_proj"}),
    ("opt", "final_layer_norm", {"fc1", "fc2"}),  # the MLP's layers are the block's own children
    # a norm on attention's output comes first: its input is not the residual point
    ("gemma3", "pre_feedforward_layernorm", {"gate_proj", "up_proj", "down_proj"}),
    ("mixtral", "post_attention_layernorm", {"gate_proj", "up_proj", "down_proj"}),  # experts, router untouched
])
def test_the_split_is_found_from_the_blocks_data_flow(family, split, mlp):
    model = build(family)[1]
    block, targets, (hidden, extras) = first_block(model, token_windows(4, 16) % 120)
    found = reconstruct.find_sub_blocks(block, targets, hidden, extras)
    assert found.split is getattr(block, split)
    assert {t.name.rsplit(".", 1)[-1] for t in found.mlp} == mlp
    assert all(".attn." in t.name or ".self_attn." in t.name for t in found.attention) and len(found.attention) >= 2
    assert len(found.attention) + len(found.mlp) == len(targets)
    # what the attention fit matches: the split's input, as the whole block computes it
    captured = []
    handle = found.split.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad():
        reconstruct.block_output(block, hidden, *extras)
        until = reconstruct.block_output(block, hidden, *extras, until=found.split)
    handle.remove()
    assert torch.equal(until, captured[0])


def test_attention_and_mlp_in_parallel_have_no_split():
    model = gptj()
    block, targets, (hidden, extras) = first_block(model, token_windows(4, 16))
    assert reconstruct.find_sub_blocks(block, targets, hidden, extras) is None


def test_sub_blocks_fit_attention_then_mlp_each_moving_only_its_own_weights(monkeypatch):
    seen = spy_on_reconstruction(monkeypatch)
    dense = tiny_model(layers=2)
    by_block, by_sub = copy.deepcopy(dense), copy.deepcopy(dense)
    config = FloatSparseConfig(0.6, keep_bits=None, reconstruct_epochs=3)
    whole = prune_blocks(by_block, token_windows(16, 32), config, progress=False)
    del seen[:]
    result = prune_blocks(by_sub, token_windows(16, 32), dataclasses.replace(config, reconstruct_unit="sub-block"),
                          progress=False)
    assert [(r["block"], r["part"]) for r in result.reconstruction] == [
        ("model.layers.0", "attention"), ("model.layers.0", "mlp"), ("model.layers.1", "attention"),
        ("model.layers.1", "mlp")]
    assert all("part" not in r for r in whole.reconstruction)
    for (before, after, report, _), part in zip(seen, ["self_attn", "mlp"] * 2):
        assert all(f".{part}." in name for name in before)  # each fit holds only its side's layers
        for name in before:
            assert torch.equal(before[name] == 0, after[name] == 0), name
        assert report["heldout_after"] <= report["heldout_before"]
    assert any(not torch.equal(a, b) for a, b in zip(by_block.state_dict().values(), by_sub.state_dict().values()))


def test_sub_blocks_fall_back_to_the_whole_block_where_there_is_no_split():
    model = gptj()
    result = prune_blocks(model, token_windows(16, 32), FloatSparseConfig(
        0.5, keep_bits=None, reconstruct_epochs=2, reconstruct_unit="sub-block"), progress=False)
    assert [r["block"] for r in result.reconstruction] == ["transformer.h.0", "transformer.h.1"]
    assert all("part" not in r for r in result.reconstruction)
