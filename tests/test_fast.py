"""Fast mode (admm_sparse.fast): held-out error against the seed mode, exactly k zeros in every mask
structure, the float32 fallback of its bfloat16 GEMMs, keep-bit rounding after it, bad options rejected."""
import math

import pytest
import torch
from torch import nn

import admm_sparse
from admm_sparse import device, fast
from admm_sparse.config import parse_config
from admm_sparse.keepbits import apply_keepbits
from admm_sparse.layer import AdmmPruner
from archs import tiny_llama


def correlated(tokens, d_in, seed):
    """Mixed channels with log-normal scales, as real activations (tests/test_quality.py's generator)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g)
    x = x @ (torch.randn(d_in, d_in, generator=g) * 2 / math.sqrt(d_in) + torch.eye(d_in))
    return x * torch.exp(torch.randn(d_in, generator=g) * 0.7)


def heldout_error(w0, w, x):
    w0, w, x = w0.double(), w.double(), x.double()
    return ((x @ (w - w0).T).norm() / (x @ w0.T).norm()).item()


def prune(mode, w0, x, ratio, **options):
    layer = nn.Linear(w0.shape[1], w0.shape[0], bias=False)
    layer.weight.data.copy_(w0)
    report = admm_sparse.prune_linear(layer, x, ratio, mode=mode, keep_bits=None, **options)
    return layer.weight.detach().clone(), report


def layer_case(d_out, d_in, seed):
    x = correlated(4 * d_in, d_in, seed)
    w0 = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed + 100)) / math.sqrt(d_in)
    return w0, x[: 2 * d_in], x[2 * d_in:]  # statistics from one half, error on the other


CASES = [(96, 128, 0.3, "unstructured", 0), (64, 256, 0.5, "unstructured", 1), (128, 128, 0.7, "unstructured", 2),
         (64, 192, 0.5, "unstructured", 3), (96, 128, 0.5, "per_row", 4), (64, 128, None, "2:4", 5),
         (64, 128, None, "4:8", 6)]


@pytest.mark.parametrize("d_out,d_in,ratio,structure,seed", CASES)
def test_heldout_error_within_1_01_of_seed(d_out, d_in, ratio, structure, seed):
    w0, calib, heldout = layer_case(d_out, d_in, seed)
    seed_w, _ = prune("seed", w0, calib, ratio, mask_structure=structure)
    fast_w, report = prune("fast", w0, calib, ratio, mask_structure=structure)
    assert heldout_error(w0, fast_w, heldout) <= 1.01 * heldout_error(w0, seed_w, heldout)
    assert report.mode == "fast" and 3 <= report.iterations <= 8 + fast.FIXED_ITERS


@pytest.mark.parametrize("d_out,d_in,ratio,structure", [(30, 40, 0.37, "unstructured"), (24, 40, 0.55, "per_row"),
                                                        (16, 48, None, "2:4"), (16, 48, None, "3:8")])
def test_exactly_k_zeros(d_out, d_in, ratio, structure):
    w0, calib, _ = layer_case(d_out, d_in, 7)
    w, report = prune("fast", w0, calib, ratio, mask_structure=structure)
    zeros = w == 0
    if structure == "unstructured":
        assert int(zeros.sum()) == int(d_out * d_in * ratio)
    elif structure == "per_row":
        assert (zeros.sum(1) == int(d_in * ratio)).all()
    else:
        n, m = (int(t) for t in structure.split(":"))
        assert (zeros.reshape(d_out, d_in // m, m).sum(2) == m - n).all()
    assert report.sparsity == int(zeros.sum()) / w.numel()


def test_ratio_zero_keeps_the_weight():
    w0, calib, _ = layer_case(16, 32, 8)
    w, _ = prune("fast", w0, calib, 0.0)
    assert (w != 0).all()
    torch.testing.assert_close(w, w0, rtol=1e-4, atol=1e-5)


def gemm_dtypes(monkeypatch, *args):
    """Run prune(*args) recording the dtype of every torch.mm the fast mode makes."""
    seen, mm = [], torch.mm

    def spy(a, b, *rest, **kw):
        seen.append(a.dtype)
        return mm(a, b, *rest, **kw)

    monkeypatch.setattr(fast.torch, "mm", spy)
    w, _ = prune(*args)
    monkeypatch.setattr(fast.torch, "mm", mm)
    return w, seen


def test_bfloat16_gemms_and_a_float32_result(monkeypatch):
    monkeypatch.setattr(device, "_bfloat16_faster", lambda device_type: True)
    w0, calib, heldout = layer_case(64, 96, 9)
    w, seen = gemm_dtypes(monkeypatch, "fast", w0, calib, 0.5)
    assert set(seen) == {torch.bfloat16} and len(seen) >= 3
    assert w.dtype == torch.float32 and int((w == 0).sum()) == w0.numel() // 2
    # the kept weights are float32 (Wn0 plus a bfloat16 correction), not bfloat16 values
    kept = w[w != 0]
    assert not torch.equal(kept, kept.bfloat16().float())
    monkeypatch.setattr(device, "_bfloat16_faster", lambda device_type: False)  # no fast bfloat16: float32 throughout
    w32, seen = gemm_dtypes(monkeypatch, "fast", w0, calib, 0.5)
    assert set(seen) == {torch.float32} and len(seen) >= 3
    assert w32.dtype == torch.float32 and int((w32 == 0).sum()) == w0.numel() // 2
    # bfloat16 only moves the mask search: the held-out errors agree to 1%
    assert heldout_error(w0, w, heldout) == pytest.approx(heldout_error(w0, w32, heldout), rel=0.01)


def test_the_gemm_dtype_follows_the_measurement(monkeypatch):
    monkeypatch.setattr(device, "_bfloat16_faster", lambda device_type: False)
    assert device.gemm_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(device, "_bfloat16_faster", lambda device_type: True)
    assert device.gemm_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.undo()
    assert device.gemm_dtype(torch.device("meta")) == torch.float32  # nothing runs there to time


def test_keep_bit_rounding_applies_afterwards():
    w0, calib, _ = layer_case(32, 64, 10)
    plain, _ = prune("fast", w0, calib, 0.5)
    layer = nn.Linear(64, 32, bias=False)
    layer.weight.data.copy_(w0)
    pruner = AdmmPruner(layer)
    pruner.add_batch(calib)
    pruner.fasterprune(0.5, mode="fast")
    torch.testing.assert_close(layer.weight.detach(), apply_keepbits(plain, pruner.scaler, 2, 0.02), rtol=0, atol=0)


@pytest.mark.parametrize("options,message", [
    (dict(fast_mask_iters=0), "fast_mask_iters"), (dict(fast_mask_iters=2.5), "fast_mask_iters"),
    (dict(fast_mask_iters=True), "fast_mask_iters"), (dict(round_in_admm=True), "not supported with mode"),
    (dict(mode="fastest"), "mode must be one of"),
])
def test_bad_options_rejected_layer_untouched(options, message):
    w0, calib, _ = layer_case(8, 16, 11)
    layer = nn.Linear(16, 8, bias=False)
    layer.weight.data.copy_(w0)
    with pytest.raises(ValueError, match=message):
        admm_sparse.prune_linear(layer, calib, 0.5, **{"mode": "fast", **options})
    assert torch.equal(layer.weight.detach(), w0)


def test_config_accepts_fast_mode():
    config = parse_config({"spec": {"process": [{"type": "float_sparse", "mode": "fast"}]}})
    assert config.mode == "fast" and config.pruner_options()["mode"] == "fast"


@pytest.mark.parametrize("low", [torch.float32, torch.bfloat16])
def test_native_passes_equal_their_aten_versions(low):
    g = torch.Generator().manual_seed(12)
    wn0, z, u = (torch.randn(40, 24, generator=g) for _ in range(3))
    gemm_out = torch.randn(40, 24, generator=g).to(low)
    native, aten = u.clone(), u.clone()
    torch.ops.admm_sparse.fast_relax(gemm_out, wn0, z, native, 0.7, 1.5)
    fast.relax_aten(gemm_out, wn0, z, aten, 0.7, 1.5)
    torch.testing.assert_close(native, aten, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(native, 1.5 * (wn0 + 0.7 * gemm_out.float()) - 0.5 * z + u, rtol=1e-5, atol=1e-5)

    pruned = torch.rand(40, 24, generator=g) < 0.4
    previous = pruned.clone()
    previous[:3] = ~previous[:3]  # 72 entries differ
    for fn in (torch.ops.admm_sparse.fast_project, fast.project_aten):
        v, zz, step = native.clone(), torch.empty_like(z), torch.empty(40, 24, dtype=low)
        assert fn(native.clone(), pruned, None, wn0, zz, step) == 0  # no previous mask: nothing counted
        assert fn(v, pruned, previous, wn0, zz, step) == 72
        assert torch.equal(v, native.masked_fill(~pruned, 0.0)) and torch.equal(zz, native.masked_fill(pruned, 0.0))
        assert torch.equal(step, (zz - v - wn0).to(low))


def test_cli_accepts_fast_mode():
    from admm_sparse.cli import _parser

    assert _parser().parse_args(["prune", "--mode", "fast"]).mode == "fast"


def test_bf16_detection_leaves_the_random_stream_alone():
    device._bfloat16_faster.cache_clear()
    state = torch.get_rng_state()
    assert isinstance(device._bfloat16_faster("cpu"), bool)
    assert torch.equal(torch.get_rng_state(), state)


def test_layers_sharing_statistics_share_one_factorisation(monkeypatch):
    """q/k/v (one input) take the inverse once, and the weights equal separately factored ones bitwise."""
    torch.manual_seed(0)
    x = correlated(256, 64, 11)
    layers = [nn.Linear(64, d_out, bias=False) for d_out in (64, 32, 32)]
    separate = [nn.Linear(64, layer.out_features, bias=False) for layer in layers]
    for a, b in zip(layers, separate):
        b.weight.data.copy_(a.weight.data)
    calls = []
    factor = fast.factor
    monkeypatch.setattr(fast, "factor", lambda *a: calls.append(1) or factor(*a))
    leader, *followers = [AdmmPruner(layer, mode="fast", keep_bits=None) for layer in layers]
    leader.add_batch(x)
    for pruner in followers:
        pruner.share_statistics(leader)
    for pruner in [leader, *followers]:
        pruner.fasterprune(0.5)
        pruner.free()
    assert len(calls) == 1
    for layer in separate:
        pruner = AdmmPruner(layer, mode="fast", keep_bits=None)
        pruner.add_batch(x)
        pruner.fasterprune(0.5)
    assert len(calls) == 4
    for a, b in zip(layers, separate):
        assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("mode,setting,bf16_fast,expected", [
    ("fast", "auto", True, torch.bfloat16), ("fast", "auto", False, torch.float32),
    ("seed", "auto", True, torch.float32), ("fast", "model", True, torch.float32),
    ("seed", "bfloat16", False, torch.bfloat16)])
def test_calibration_forwards_run_in_the_configured_dtype(monkeypatch, mode, setting, bf16_fast, expected):
    """auto: bfloat16 forwards in fast mode where bfloat16 is faster; the model's own dtype otherwise."""
    from admm_sparse.config import FloatSparseConfig
    from admm_sparse.pipeline import prune_model

    monkeypatch.setattr(device, "_bfloat16_faster", lambda device_type: bf16_fast)
    model = tiny_llama()
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    config = FloatSparseConfig(0.5, mode=mode, calibration_dtype=setting, keep_bits=None)
    prune_model(model, torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1)), config,
                progress=False)
    assert seen and set(seen) == {expected}
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_calibration_dtype_option_is_checked_and_reaches_yaml_and_cli():
    from admm_sparse.cli import _parser
    from admm_sparse.config import ConfigError, FloatSparseConfig

    with pytest.raises(ConfigError, match="calibration_dtype: expected one of"):
        FloatSparseConfig(calibration_dtype="float8")
    with pytest.raises(ConfigError, match=r"spec.process\[0\].calibration_dtype"):
        parse_config({"spec": {"process": [{"type": "float_sparse", "calibration_dtype": "half"}]}})
    config = parse_config({"spec": {"process": [{"type": "float_sparse", "calibration_dtype": "bfloat16"}]}})
    assert config.calibration_dtype == "bfloat16" and "calibration_dtype" not in config.pruner_options()
    assert _parser().parse_args(["prune", "--calibration-dtype", "model"]).calibration_dtype == "model"


def test_factor_on_one_thread_restores_the_thread_count(monkeypatch):
    threads = torch.get_num_threads()
    seen = []
    inverse = fast._ops.damped_cholesky_inverse

    def spy(*args):
        seen.append(torch.get_num_threads())
        return inverse(*args)

    monkeypatch.setattr(fast._ops, "damped_cholesky_inverse", spy)
    h = torch.eye(8) * 2
    f = fast.factor(h, 0.1, 1.0, torch.float32)
    assert seen == [1] and torch.get_num_threads() == threads
    torch.testing.assert_close(f.hinv, torch.eye(8) / 2.1)  # Hn = I, shift 0.1 + 1
