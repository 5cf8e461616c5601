"""Distillation (admm_sparse.distill): the whole pruned model fitted to the dense model's next-token distributions
after the block loop."""
import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from admm_sparse import distill, fit
from admm_sparse.config import OPTIONS, ConfigError, FloatSparseConfig, parse_config
from admm_sparse.distill import kl_to_dense
from admm_sparse.distributed import Group
from admm_sparse.evaluate import nll_sum
from admm_sparse.host_stream import HostStream
from admm_sparse.keepbits import round_float16
from admm_sparse.pipeline import prune_blocks, prune_model
from admm_sparse.plan import make_plan
from admm_sparse.resume import ResumeState
from admm_sparse.stream import head_logits
from transformers import StaticCache

from test_pipeline import PlainModel, tiny_model, token_windows
from test_reconstruct import step_rates


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 9), vocab=st.integers(2, 40), scale=st.floats(0.1, 30.0), seed=st.integers(0, 2**16))
def test_kl_against_torch_kl_div(tokens, vocab, scale, seed):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(2, tokens, vocab, generator=g) * scale
    pruned = torch.randn(2, tokens, vocab, generator=g) * scale
    want = F.kl_div(F.log_softmax(pruned, -1), F.log_softmax(dense, -1), log_target=True, reduction="sum") \
        / (2 * tokens)
    assert kl_to_dense(pruned, dense).item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    assert kl_to_dense(dense, dense).item() == pytest.approx(0.0, abs=1e-5)
    # bfloat16 logits are compared in float32
    assert kl_to_dense(pruned.bfloat16(), dense).dtype == torch.float32


def test_head_logits_of_the_stacks_output_are_the_models_logits():
    """The dense distributions come from the dense stream's final hidden states through the model's own head."""
    model = tiny_model(layers=2)
    batch = token_windows(2, 16)
    stack_out = []
    hook = model.model.layers[-1].register_forward_hook(
        lambda module, args, out: stack_out.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        want = model(input_ids=batch).logits
        hook.remove()
        got = head_logits(model, "model.layers", model.model.layers, batch, stack_out[0])
    assert torch.allclose(got, want, atol=1e-5)
    assert all(type(b).__name__ == "LlamaDecoderLayer" for b in model.model.layers)  # the stack is back


def pruned_pair(layers=2, **options):
    """(dense, the model pruned without distillation, the model pruned with it, its result) on 16 windows."""
    dense = tiny_model(layers=layers)
    calib = token_windows(16, 32)
    plain, distilled = copy.deepcopy(dense), copy.deepcopy(dense)
    config = dict(sparse_ratio=0.6, keep_bits=None, **options)
    prune_model(plain, calib, FloatSparseConfig(**config), progress=False)
    result = prune_blocks(distilled, calib, FloatSparseConfig(**config, distill_epochs=4, distill_lr=3e-3),
                          progress=False)
    return dense, plain, distilled, result, calib


def heldout_kl(model, dense, calib):
    """The mean KL of the held-out calibration windows (every 8th), measured apart from the report."""
    _, held = fit.holdout_split(len(calib))
    with torch.no_grad():
        return sum(kl_to_dense(model(input_ids=calib[b:b + 1]).logits, dense(input_ids=calib[b:b + 1]).logits).item()
                   for b in held) / len(held)


def test_zeros_stay_the_fit_lowers_the_held_out_kl_and_the_report_says_so():
    dense, plain, distilled, result, calib = pruned_pair()
    r = result.distillation
    assert set(r) == {"fit_batches", "sampled_batches", "heldout_batches", "heldout_before", "heldout_after", "epochs",
                      "best_epoch", "heldout_by_epoch", "seconds"}
    assert (r["fit_batches"], r["sampled_batches"], r["heldout_batches"]) == (14, 0, 2) and 1 <= r["best_epoch"] <= r["epochs"] <= 4
    assert len(r["heldout_by_epoch"]) == r["epochs"] and r["heldout_by_epoch"][r["best_epoch"] - 1] == \
        r["heldout_after"] == min(r["heldout_by_epoch"])
    assert r["heldout_after"] < r["heldout_before"]
    # the report's figures are the models' own: before = the loop's result (the model pruned without it)
    assert r["heldout_before"] == pytest.approx(heldout_kl(plain, dense, calib), rel=1e-4)
    assert r["heldout_after"] == pytest.approx(heldout_kl(distilled, dense, calib), rel=1e-4)
    targets = make_plan(distilled, FloatSparseConfig(0.6), None).targets
    moved = 0
    for name, t in targets.items():
        before = plain.get_submodule(name).weight
        assert torch.equal(before == 0, t.weight == 0), name
        moved += not torch.equal(before, t.weight)
    assert moved == len(targets)  # every pruned layer is fitted, in every block
    # what is not a pruned weight is unchanged: norms, embeddings, head
    plain_state = plain.state_dict()
    for key, value in distilled.state_dict().items():
        if not any(key == f"{name}.weight" for name in targets):
            assert torch.equal(value, plain_state[key]), key


def test_a_fit_that_only_gets_worse_is_dropped_bitwise():
    dense = tiny_model(layers=2)
    plain, distilled = copy.deepcopy(dense), copy.deepcopy(dense)
    calib = token_windows(16, 32)
    prune_model(plain, calib, FloatSparseConfig(0.5), progress=False)
    result = prune_blocks(distilled, calib, FloatSparseConfig(0.5, distill_epochs=5, distill_lr=10.0), progress=False)
    assert result.distillation["best_epoch"] == 0 and result.distillation["epochs"] == fit.PATIENCE
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in distilled.state_dict().items())


def test_keep_bit_rounding_holds_after_the_fit():
    """With keep_bits the fit works on the rounding's grid (straight-through): every distilled weight has keep_bits
    mantissa bits in float16 but the keep_proportion whose mantissa stays whole; the unrounded masters would not."""
    model = tiny_model(layers=2)
    result = prune_blocks(model, token_windows(16, 32), FloatSparseConfig(0.5, keep_bits=2, distill_epochs=3,
                                                                          distill_lr=3e-3), progress=False)
    assert result.distillation["best_epoch"] >= 1
    for name, t in make_plan(model, FloatSparseConfig(0.5), None).targets.items():
        w = t.weight.detach()
        assert torch.equal(w.half().float(), w), name  # float16 values, as delivered
        off_grid = (round_float16(w, None, 2).float() != w).float().mean().item()
        assert off_grid <= 0.03, name  # keep_proportion 0.02 of whole mantissas, ties at its threshold aside


def test_evaluation_and_writer_see_the_distilled_model():
    """The loop's perplexity after pruning and the written tensors are those of the model after distillation."""
    dense = tiny_model(layers=2)
    model = copy.deepcopy(dense)
    written = {}

    class Writer:
        def add(self, tensors):
            written.update({k: v.detach().clone() for k, v in tensors.items()})

    windows = token_windows(4, 32, seed=5)
    result = prune_blocks(model, token_windows(16, 32), FloatSparseConfig(0.6, keep_bits=None, distill_epochs=2,
                                                                          distill_lr=3e-3),
                          progress=False, writer=Writer(), eval_windows=windows)
    assert result.distillation["best_epoch"] >= 1
    with torch.no_grad():
        nll, count = nll_sum(model(input_ids=windows).logits, windows)
    assert result.perplexity_after == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert set(written) == set(model.state_dict())
    assert all(torch.equal(written[k], v) for k, v in model.state_dict().items())


def test_host_streams_give_the_same_model():
    """The dense finals as a host stream (stream_memory host), the sampled windows' too, give the model device
    streams give, bit for bit."""
    dense = tiny_model(layers=2)
    models = [copy.deepcopy(dense) for _ in range(2)]
    for model, memory in zip(models, ("device", "host")):
        prune_blocks(model, token_windows(16, 32), FloatSparseConfig(0.5, keep_bits=None, distill_epochs=2,
                                                                     distill_lr=3e-3, distill_samples=4,
                                                                     stream_memory=memory),
                     progress=False)
    a, b = (m.state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], dense.state_dict()[k]) for k in a)


def sample_by_whole_prefix(model, prompts, length, generator):
    """Sampling as sample_windows does, but the whole prefix through the model at every step (no cache)."""
    tokens = prompts
    while tokens.shape[1] < length:
        with torch.no_grad():
            logits = model(input_ids=tokens, use_cache=False).logits
        tokens = torch.cat([tokens, torch.multinomial(torch.softmax(logits[:, -1].float(), -1), 1,
                                                      generator=generator)], 1)
    return tokens


@pytest.mark.parametrize("static", [True, False])
def test_sampled_windows_continue_fitted_prompts_from_the_models_distribution(monkeypatch, static):
    """With a static key-value cache where the model takes one, the model's own cache where it does not."""
    monkeypatch.setattr(distill, "SAMPLE_TOKENS", 16 * 32)  # 16 windows of 32 tokens at a time
    made = []
    real = distill._static_cache
    monkeypatch.setattr(distill, "_static_cache", lambda *a: made.append(real(*a)) or made[-1])
    model = tiny_model(layers=2)
    model._can_compile_fullgraph = static
    calib = token_windows(16, 32)
    batches = list(calib.split(2))  # batches of 2 windows: 8 batches, the last held out
    count = 16 + 3  # two chunks, the second one short
    grad = []
    model.register_forward_hook(lambda *_: grad.append(torch.is_grad_enabled()))
    with torch.enable_grad():  # no graph kept over the steps (it would hold every step's activations)
        windows, seconds = distill.sample_windows(model, batches, count, torch.device("cpu"), contextlib.nullcontext)
    assert grad and not any(grad)
    assert [tuple(w.shape) for w in windows] == [(2, 32)] * (count // 2) + [(1, 32)] and seconds > 0
    got = torch.cat(windows)
    fitted = calib[:14]  # batches 0-6: every prompt from a fitted window, none from the held-out batch
    prompts = fitted[torch.arange(count) % 14, :distill.PROMPT_TOKENS]
    assert torch.equal(got[:, :distill.PROMPT_TOKENS], prompts)
    # the key-value cache changes nothing: the same tokens as the whole prefix run at every step, same generator
    generator = torch.Generator().manual_seed(distill.SAMPLING_SEED)
    want = torch.cat([sample_by_whole_prefix(model, chunk, 32, generator)
                      for chunk in prompts.split(16)])
    assert torch.equal(got, want)
    assert len(made) == 2  # one cache per chunk: static, a window long, where the model takes one
    assert all(isinstance(c, StaticCache) and c.get_max_length() == 32 if static else c is None for c in made)
    assert (got[:, distill.PROMPT_TOKENS:] != got[:1, distill.PROMPT_TOKENS:]).float().mean() > 0.5  # sampled
    with pytest.raises(ValueError, match="must be longer"):
        distill.sample_windows(model, list(token_windows(8, distill.PROMPT_TOKENS).split(1)), 1,
                               torch.device("cpu"), contextlib.nullcontext)


@pytest.mark.parametrize("memory", ["device", "host"])
def test_the_sampled_windows_dense_finals_give_the_dense_models_logits(monkeypatch, memory):
    """The loop's stream of sampled windows runs through the dense blocks only: through the head, its final states
    are the dense model's own logits on those windows, while the model is pruned."""
    seen = {}
    real = distill.distill
    monkeypatch.setattr(distill, "distill", lambda *a, **k: seen.update(k) or real(*a, **k))
    dense = tiny_model(layers=2)
    model = copy.deepcopy(dense)
    prune_blocks(model, token_windows(16, 32), FloatSparseConfig(0.6, keep_bits=None, distill_epochs=1,
                                                                 distill_samples=5, stream_memory=memory),
                 batch_size=2, progress=False)
    assert [len(b) for b in seen["sampled"]] == [2, 2, 1] and len(seen["sampled_finals"]) == 3
    # held as the loop's other streams are: in host memory, moved to the device a batch at a time, with `host`
    assert isinstance(seen["sampled_finals"], HostStream) == (memory == "host")
    with torch.no_grad():
        for batch, final in zip(seen["sampled"], seen["sampled_finals"]):
            want = dense(input_ids=batch).logits
            assert torch.allclose(head_logits(dense, "model.layers", dense.model.layers, batch, final), want,
                                  atol=1e-5)
            assert not torch.allclose(model(input_ids=batch).logits, want, atol=1e-3)  # the model was pruned


def test_sampled_windows_are_fitted_and_reported():
    """distill_samples: the sampled windows join the fitted batches (the result moves), the held-out ones stay the
    calibration's, and the report counts them and the sampling's time."""
    dense = tiny_model(layers=2)
    calib = token_windows(16, 32)
    models = [copy.deepcopy(dense) for _ in range(2)]
    results = [prune_blocks(model, calib, FloatSparseConfig(0.6, keep_bits=None, distill_epochs=2, distill_lr=3e-3,
                                                            distill_samples=samples), progress=False)
               for model, samples in zip(models, (0, 12))]
    plain, sampled = (r.distillation for r in results)
    assert (sampled["fit_batches"], sampled["sampled_batches"], sampled["heldout_batches"]) == (14, 12, 2)
    assert sampled["sampling_seconds"] > 0 and "sampling_seconds" not in plain
    assert sampled["heldout_before"] == plain["heldout_before"]  # the same loop, the same held-out windows
    assert sampled["heldout_after"] < sampled["heldout_before"]
    assert sampled["heldout_after"] == pytest.approx(heldout_kl(models[1], dense, calib), rel=1e-4)
    a, b = (m.state_dict() for m in models)
    assert not all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k] == 0, b[k] == 0) for k in a if k.endswith("proj.weight"))  # the same masks


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_learning_rate_schedule(monkeypatch, schedule):
    """distill_schedule reaches the fit: cosine, each step's rate is the first one times (1 + cos(pi s / S)) / 2, S =
    epochs x fitted batches (the sampled ones included), s the steps before it; constant, every step's the first."""
    rates = step_rates(monkeypatch)
    config = FloatSparseConfig(0.5, keep_bits=None, distill_epochs=3, distill_samples=4, distill_schedule=schedule)
    report = prune_blocks(tiny_model(layers=1), token_windows(16, 32), config, progress=False).distillation
    total = 3 * (report["fit_batches"] + report["sampled_batches"])
    assert len(rates) == total and report["sampled_batches"] > 0 and rates[0] > 0
    factors = [0.5 * (1 + math.cos(math.pi * s / total)) if schedule == "cosine" else 1.0 for s in range(total)]
    assert rates == pytest.approx([rates[0] * f for f in factors], rel=1e-12)


def test_the_allocations_probe_pass_does_not_distill(monkeypatch):
    """allocation error runs the loop twice (a probe pass, then the pruning): distillation runs once, at the end."""
    calls = []
    real = distill.distill
    monkeypatch.setattr(distill, "distill", lambda *a, **k: calls.append(1) or real(*a, **k))
    prune_blocks(tiny_model(layers=1), token_windows(16, 32), FloatSparseConfig(0.5, allocation="error",
                                                                                distill_epochs=1), progress=False)
    assert calls == [1]


def test_off_by_default():
    assert FloatSparseConfig().distill_epochs == 0
    result = prune_blocks(tiny_model(layers=1), token_windows(), FloatSparseConfig(0.5), progress=False)
    assert result.distillation == {}


def test_refusals(tmp_path):
    config = FloatSparseConfig(0.5, distill_epochs=1)
    flat = torch.nn.Sequential(torch.nn.Embedding(300, 16), torch.nn.Linear(16, 16))
    with pytest.raises(ValueError, match="needs a stack of blocks"):
        prune_model(flat, token_windows(), config, progress=False)
    with pytest.raises(ValueError, match="not a causal language model"):  # a stack, but no input_ids
        prune_blocks(PlainModel(), token_windows(), config, progress=False)
    with pytest.raises(ValueError, match="one process"):

        class TwoProcesses(Group):
            size = 2

        prune_blocks(tiny_model(layers=1), token_windows(), config, progress=False, group=TwoProcesses())
    with pytest.raises(ValueError, match="at least 2 calibration batches"):
        prune_blocks(tiny_model(layers=1), token_windows(1), config, progress=False)
    with pytest.raises(ValueError, match="no per-block state"):
        prune_blocks(tiny_model(layers=1), token_windows(), config, progress=False,
                     state=ResumeState(tmp_path, {}))

    class Streamed:  # any source that is not the model in memory
        pass

    with pytest.raises(ValueError, match="must be in memory"):
        prune_blocks(tiny_model(layers=1), token_windows(), config, progress=False, source=Streamed())


def test_config_options():
    config = parse_config({"spec": {"process": [{"type": "float_sparse", "distill_epochs": 2, "distill_lr": 1e-4}]}})
    assert (config.distill_epochs, config.distill_lr) == (2, 1e-4)
    with pytest.raises(ConfigError, match="distill_epochs"):
        FloatSparseConfig(distill_epochs=-1)
    with pytest.raises(ConfigError, match="distill_lr"):
        FloatSparseConfig(distill_lr=0)
    assert parse_config({"spec": {"process": [{"type": "float_sparse", "distill_epochs": 2,
                                               "distill_samples": 64}]}}).distill_samples == 64
    with pytest.raises(ConfigError, match="distill_samples.*whole number"):
        FloatSparseConfig(distill_epochs=1, distill_samples=-1)
    with pytest.raises(ConfigError, match="distill_samples.*set distill_epochs"):
        FloatSparseConfig(distill_samples=8)
    assert parse_config({"spec": {"process": [{"type": "float_sparse", "distill_epochs": 2,
                                               "distill_schedule": "cosine"}]}}).distill_schedule == "cosine"
    with pytest.raises(ConfigError, match="^distill_schedule: "):
        FloatSparseConfig(distill_schedule="linear")
    # config does not import the fit modules: its doc states the prompt's length, which must be sample_windows's
    doc = next(o.doc for o in OPTIONS if o.name == "distill_samples")
    assert f"the first {distill.PROMPT_TOKENS} tokens" in doc
