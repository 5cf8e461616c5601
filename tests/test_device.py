"""admm_sparse.device and the generic path: every op on a device without native kernels, the CPU fallback of an
op a device lacks, the backend table, the missing-plugin error; and the suite's device tests, on the device
ADMM_SPARSE_TEST_DEVICE names (e.g. npu:0, xpu), else CUDA where present, else skipped."""
import importlib.util
import os

import pytest
import torch
from torch import nn

import admm_sparse
from admm_sparse import _ops, device, generic
from admm_sparse.layer import AdmmPruner
from archs import tiny_llama


def correlated(tokens, d_in, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g) @ (torch.randn(d_in, d_in, generator=g) / d_in**0.5 + torch.eye(d_in))
    return x * torch.exp(torch.randn(d_in, generator=g) * 0.5)


def layer_pair(d_out, d_in, seed=0):
    torch.manual_seed(seed)
    a = nn.Linear(d_in, d_out, bias=False)
    b = nn.Linear(d_in, d_out, bias=False)
    b.weight.data.copy_(a.weight.data)
    return a, b


def assert_same_pruning(a: torch.Tensor, b: torch.Tensor, max_flips: float = 0.0):
    """The same masks (at most max_flips of the entries differ: near ties under float32 rounding) and the same
    weights within float32 tolerance where both keep them."""
    flips = int(((a == 0) != (b == 0)).sum())
    assert flips <= max_flips * a.numel(), f"{flips} mask entries differ"
    both = (a != 0) & (b != 0)
    torch.testing.assert_close(a[both], b[both], rtol=2e-3, atol=2e-3 * a.abs().max().item())


MODES = [("seed", "unstructured"), ("seed", "per_row"), ("seed", "2:4"), ("quality", "unstructured"),
         ("quality", "2:4"), ("fast", "unstructured"), ("fast", "per_row"), ("fast", "4:8")]


@pytest.mark.parametrize("mode,structure", MODES)
@pytest.mark.parametrize("keep_bits", [None, 2])
def test_the_generic_path_prunes_as_the_native_one(mode, structure, keep_bits):
    native_layer, generic_layer = layer_pair(48, 64)
    x = correlated(256, 64, 1)
    ratio = None if ":" in structure else 0.5
    options = dict(mode=mode, mask_structure=structure, keep_bits=keep_bits)
    admm_sparse.prune_linear(native_layer, x, ratio, **options)
    with device.generic_kernels():
        assert not device.native("admm_prune", torch.device("cpu"))
        admm_sparse.prune_linear(generic_layer, x, ratio, **options)
    assert_same_pruning(native_layer.weight.detach(), generic_layer.weight.detach(), max_flips=0.002)


def test_generic_ops_match_the_native_ones():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(30, 40, generator=g).round(decimals=1)  # ties: the lower index goes first in both
    for k in (0, 7, 600, 1200):
        assert torch.equal(_ops.prune_mask(values, k), generic.prune_mask(values, k))
    assert torch.equal(_ops.prune_mask_rows(values, 13), generic.prune_mask_rows(values, 13))
    assert torch.equal(_ops.prune_mask_nm(values, 2, 4), generic.prune_mask_nm(values, 2, 4))
    x = correlated(200, 40, 4)
    h = (x.T @ x).tril()
    w = torch.randn(30, 40, generator=g)
    native = _ops.admm_prune(h, w, 600, 0.1, 1.0, 20, 15)
    plain = generic.admm_prune(h, w, 600, 0.1, 1.0, 20, 15)
    assert_same_pruning(native[0], plain[0])
    torch.testing.assert_close(native[1], plain[1])
    torch.testing.assert_close(native[2], plain[2], rtol=1e-5, atol=0)


def test_an_op_the_device_lacks_runs_on_the_cpu(monkeypatch):
    """damped_cholesky_inverse on a device without a Cholesky factorisation: the generic op, whose factorisation
    runs on the CPU; the statistics of a device without float64 are summed on the CPU."""
    x = correlated(100, 24, 5)
    h = (x.T @ x).tril()
    calls = []
    real = generic.damped_cholesky_inverse
    monkeypatch.setattr(generic, "damped_cholesky_inverse", lambda *a: calls.append(a[0].device) or real(*a))
    with device.unsupported("cholesky"):
        assert not device.supports("cholesky", torch.device("cpu"))
        inverse, used = _ops.damped_cholesky_inverse(h, 1.0)
    assert len(calls) == 1
    expected, _ = torch.ops.admm_sparse.damped_cholesky_inverse(h, 1.0)
    torch.testing.assert_close(inverse, expected, rtol=1e-5, atol=1e-7)
    assert float(used) == 1.0
    native, fallback = layer_pair(16, 24)
    admm_sparse.prune_linear(native, x, 0.5)
    with device.unsupported("float64"):
        assert device.statistics_device(torch.device("cpu")).type == "cpu"
        admm_sparse.prune_linear(fallback, x, 0.5)
    assert_same_pruning(native.weight.detach(), fallback.weight.detach())


def test_the_generic_inverse_retries_with_more_damping():
    singular = torch.zeros(5, 5)
    singular[0, 0] = 1.0
    inverse, used = generic.damped_cholesky_inverse(singular, 0.0)
    assert float(used) > 0 and torch.isfinite(inverse).all()
    with pytest.raises(RuntimeError, match="NaN or inf"):
        generic.damped_cholesky_inverse(torch.full((3, 3), float("nan")), 1.0)


def test_backend_table():
    assert [device.backend(torch.device(t)) for t in ("cpu", "cuda", "xpu")] == ["gloo", "nccl", "xccl"]
    assert device.BACKENDS["npu"] == "hccl"
    with pytest.warns(UserWarning, match="gloo"):
        assert device.backend(torch.device("meta")) == "gloo"
    assert device.one_device_per_process(torch.device("cpu")) == {}


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed here")
@pytest.mark.parametrize("name", ["npu", "npu:1"])
def test_a_missing_plugin_is_named(name):
    with pytest.raises(ValueError, match="torch_npu.*pip install torch-npu"):
        device.resolve(name)


def test_device_names():
    assert device.resolve("cpu") == torch.device("cpu")
    assert device.resolve("auto").type in ("cpu", "cuda", "npu", "xpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        device.resolve("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no usable cuda device"):
            device.resolve("cuda:1")


def test_declaring_an_unknown_ability_is_refused():
    with pytest.raises(ValueError, match="unknown ability"):
        with device.unsupported("tensor cores"):
            pass


# ---------------------------------------------------------------- on the device under test

def _device_under_test():
    name = os.environ.get("ADMM_SPARSE_TEST_DEVICE")
    if name:
        return device.resolve(name)
    return torch.device("cuda") if torch.cuda.is_available() else None


TEST_DEVICE = _device_under_test()
on_device = pytest.mark.skipif(TEST_DEVICE is None, reason="no accelerator: set ADMM_SPARSE_TEST_DEVICE (e.g. npu:0)")


@on_device
@pytest.mark.parametrize("mode,structure", MODES)
def test_pruning_on_the_device_matches_the_cpu(mode, structure):
    cpu_layer, dev_layer = layer_pair(96, 128, seed=7)
    dev_layer.to(TEST_DEVICE)
    x = correlated(512, 128, 8)
    ratio = None if ":" in structure else 0.5
    options = dict(mode=mode, mask_structure=structure, keep_bits=2)
    admm_sparse.prune_linear(cpu_layer, x, ratio, **options)
    report = admm_sparse.prune_linear(dev_layer, x.to(TEST_DEVICE), ratio, **options)
    assert report.sparsity >= 0.5 - 1e-9
    # fast mode's bfloat16 iterations differ between devices' GEMMs: a few more near-tie flips
    assert_same_pruning(cpu_layer.weight.detach(), dev_layer.weight.detach().cpu(),
                        max_flips=0.01 if mode == "fast" else 0.002)


@on_device
def test_statistics_on_the_device_match_the_cpu():
    x = correlated(300, 64, 9)
    a, b = layer_pair(8, 64)
    cpu, dev = AdmmPruner(a), AdmmPruner(b.to(TEST_DEVICE))
    for part in x.split(100):
        cpu.add_batch(part)
        dev.add_batch(part.to(TEST_DEVICE))
    torch.testing.assert_close(dev.H.cpu(), cpu.H, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(dev.scaler.cpu(), cpu.scaler, rtol=1e-5, atol=1e-5)


@on_device
@pytest.mark.parametrize("preset", ["seed", "fast", "best"])
def test_a_model_pruned_on_the_device_matches_the_cpu(preset):
    """The whole block loop on the device (model kept on the CPU, each block moved there): the same masks as on the
    CPU up to near-tie flips, every weight finite and on the CPU afterwards."""
    from admm_sparse.config import FloatSparseConfig
    from admm_sparse.pipeline import prune_model

    config = FloatSparseConfig.from_preset(preset, sparse_ratio=0.5) if preset != "seed" else FloatSparseConfig(0.5)
    on_cpu, on_dev = tiny_llama(), tiny_llama()
    rows = prune_model(on_cpu, WINDOWS, config, progress=False)
    prune_model(on_dev, WINDOWS, config, progress=False, device=TEST_DEVICE)
    assert all(p.device.type == "cpu" for p in on_dev.parameters())
    for row in rows:
        a = on_cpu.get_submodule(row["name"]).weight.detach()
        b = on_dev.get_submodule(row["name"]).weight.detach()
        assert torch.isfinite(b).all() and (b == 0).float().mean() >= 0.5 - 1e-9, row["name"]
        assert ((a == 0) != (b == 0)).float().mean() < 0.02, row["name"]


# ---------------------------------------------------------------- float16 calibration (the Atlas card has no bfloat16)

WINDOWS = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def test_float16_calibration_runs_the_forwards_in_float16_and_the_statistics_in_float32():
    from admm_sparse.config import FloatSparseConfig
    from admm_sparse.pipeline import prune_model

    model, reference = tiny_llama(), tiny_llama()
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    rows = prune_model(model, WINDOWS, FloatSparseConfig(0.5, calibration_dtype="float16", keep_bits=None),
                       progress=False)
    prune_model(reference, WINDOWS, FloatSparseConfig(0.5, calibration_dtype="model", keep_bits=None), progress=False)
    assert seen and set(seen) == {torch.float16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for row in rows:
        a = model.get_submodule(row["name"]).weight.detach()
        b = reference.get_submodule(row["name"]).weight.detach()
        assert row["sparsity"] == 0.5 and torch.isfinite(a).all()
        assert ((a == 0) != (b == 0)).float().mean() < 0.05, row["name"]  # float16 rounding moves a few entries


@pytest.mark.parametrize("where", ["input", "output"])
def test_a_float16_overflow_is_an_error_naming_where(where):
    """Activations beyond 65504: inside a block (a layer's input) or on the stream between blocks."""
    from admm_sparse.config import FloatSparseConfig
    from admm_sparse.pipeline import prune_model

    model = tiny_llama()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        if where == "input":  # up_proj's output, hence down_proj's input, beyond float16
            mlp.up_proj.weight.mul_(1e5)
            mlp.gate_proj.weight.mul_(1e5)
            match = "calibration input of model.layers.0.mlp.down_proj overflowed float16"
        else:  # only the block's output: down_proj is not pruned, its outputs overflow into the stream
            mlp.down_proj.weight.mul_(1e7)
            match = r"overflowed in block 0 \(model.layers.0\)"
    config = FloatSparseConfig(0.5, calibration_dtype="float16", keep_bits=None,
                               exclude=["*down_proj"] if where == "output" else [])
    with pytest.raises(ValueError, match=match):
        prune_model(model, WINDOWS, config, progress=False)
