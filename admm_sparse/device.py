"""What differs between devices, in one place: no other module of the package names a device type.

- which device a name means (`resolve`: "auto", "cpu", "cuda:1", "npu", "xpu", "mps", ...), with a clear error when
  the device's PyTorch plugin is missing (Ascend NPUs need `torch_npu`) or the device is absent;
- the distributed backend of a device type (`backend`): gloo for CPUs, nccl for CUDA, hccl for Ascend NPUs,
  xccl for XPUs; any other type gets gloo, with a warning;
- the device's runtime (`synchronize`, `empty_cache`, `set_device`, `memory_allocated`);
- which of admm_sparse's native kernels the device has (`native`): CPU and CUDA builds register them per
  dispatch key; any other device runs their plain-PyTorch twins (admm_sparse.generic);
- what the device can compute (`supports`): a Cholesky factorisation and float64 arithmetic are probed once per
  device type; an op the device lacks runs on the CPU, moving only its d_in x d_in matrix;
- what it computes fast (`gemm_dtype`: bfloat16 GEMMs where measured faster than float32), how a
  factorisation runs fastest (`factorisation_threads`: on one thread on CPUs), and the float32 GEMMs' precision
  (`float32_matmuls`: full float32, or TF32 where opted in).

`generic_kernels()` and `unsupported(...)` force the generic path or declare an op missing, so that the CPU can
test both (tests/test_device.py).
"""
from __future__ import annotations

import functools
import importlib
import time
import warnings
from contextlib import contextmanager, nullcontext

import torch

# Distributed backend per device type (torch.distributed's names).
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl", "xpu": "xccl"}
# Device types that need a plugin package, and how to get it.
PLUGINS = {"npu": ("torch_npu", "Huawei's Ascend plugin: pip install torch-npu (the version matching your torch) "
                                "with the CANN toolkit installed")}
# Dispatch key of each device type's kernels (torch_npu registers its device as PrivateUse1).
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "npu": "PrivateUse1", "xpu": "XPU", "mps": "MPS"}
# Abilities `supports` probes, by name.
ABILITIES = ("cholesky", "float64")
BF16_MIN_SPEEDUP = 1.3  # bfloat16 GEMMs only where measured at least this much faster than float32

_forced_generic = False
_declared_unsupported: set[str] = set()


def _load_plugin(kind: str) -> None:
    if kind in PLUGINS:
        package, how = PLUGINS[kind]
        try:
            importlib.import_module(package)
        except ImportError as exc:
            raise ValueError(f"device '{kind}' needs the PyTorch plugin '{package}', which is not installed "
                             f"({exc}): {how}") from exc


def runtime(device: torch.device):
    """The torch module of the device's runtime (torch.cuda, torch.npu, torch.xpu, torch.mps), None for the CPU."""
    return None if device.type == "cpu" else getattr(torch, device.type, None)


def resolve(name: str | torch.device) -> torch.device:
    """The device a name means. "auto": the first of CUDA, an Ascend NPU (when torch_npu is installed) and XPU
    that is available, else the CPU. A device whose plugin is missing or that is not present is an error that
    says so."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        for kind in ("cuda", "npu", "xpu"):
            try:
                _load_plugin(kind)
            except ValueError:
                continue
            module = getattr(torch, kind, None)
            if module is not None and module.is_available():
                return torch.device(kind)
        return torch.device("cpu")
    kind = name.split(":")[0]
    _load_plugin(kind)
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r} ({exc}); e.g. cpu, cuda, cuda:1, npu, npu:1, xpu, mps") from exc
    module = runtime(device)
    if device.type != "cpu" and (module is None or not module.is_available()):
        raise ValueError(f"device {name!r}: this PyTorch has no usable {device.type} device (is it built with "
                         f"{device.type} support, and is the driver there?); use --device cpu")
    if device.index is not None and hasattr(module, "device_count") and device.index >= module.device_count():
        raise ValueError(f"device {name!r}: only {module.device_count()} {device.type} device(s) are present")
    return device


def backend(device: torch.device) -> str:
    """torch.distributed's backend for processes computing on `device`."""
    if device.type not in BACKENDS:
        warnings.warn(f"no distributed backend is known for '{device.type}' devices; using gloo, which moves every "
                      "collective through host memory", stacklevel=2)
    return BACKENDS.get(device.type, "gloo")


def local_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of the process with this local rank: one accelerator per process, the CPU shared."""
    if device.type == "cpu":
        return device
    local = torch.device(device.type, local_rank)
    set_device(local)
    return local


def one_device_per_process(device: torch.device) -> dict:
    """init_process_group's keyword for binding the group to this process's accelerator (none on CPUs)."""
    return {} if device.type == "cpu" else {"device_id": device}


def set_device(device: torch.device) -> None:
    module = runtime(device)
    if module is not None and hasattr(module, "set_device"):
        module.set_device(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timings); nothing on the CPU."""
    module = runtime(device)
    if module is not None and hasattr(module, "synchronize"):
        module.synchronize(device) if device.type != "mps" else module.synchronize()


def empty_cache(device: torch.device) -> None:
    """Return the allocator's cached blocks to the device (between blocks of the model)."""
    module = runtime(device)
    if module is not None and hasattr(module, "empty_cache"):
        module.empty_cache()


def memory_allocated(device: torch.device) -> int | None:
    """Bytes the device's allocator holds now; None on the CPU (see pipeline.peak_memory_bytes)."""
    module = runtime(device)
    if module is None or not hasattr(module, "memory_allocated"):
        return None
    return int(module.memory_allocated(device) if device.type != "mps" else module.current_allocated_memory())


# ---------------------------------------------------------------- kernels and abilities

def native(op: str, device: torch.device) -> bool:
    """Whether admm_sparse's native kernel of `op` (e.g. "admm_prune") is registered for the device's type (the
    CPU build has CPU kernels, a CUDA build CUDA ones too), and the generic path is not forced."""
    key = DISPATCH_KEYS.get(device.type)
    return not _forced_generic and key is not None and \
        torch._C._dispatch_has_kernel_for_dispatch_key(f"admm_sparse::{op}", key)


@functools.lru_cache(maxsize=None)
def _probe(ability: str, device_type: str) -> bool:
    device = torch.device(device_type)
    try:
        if ability == "cholesky":
            a = torch.eye(3, device=device) * 2.0
            factor, info = torch.linalg.cholesky_ex(a)
            torch.cholesky_inverse(factor)
            torch.cholesky_solve(a, factor)
            return int(info) == 0
        return bool((torch.ones(2, dtype=torch.float64, device=device) * 3).sum() == 6)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def supports(ability: str, device: torch.device) -> bool:
    """Whether the device computes `ability` (one of ABILITIES), probed once per device type."""
    if ability not in ABILITIES:
        raise ValueError(f"unknown ability {ability!r}; known: {ABILITIES}")
    return ability not in _declared_unsupported and (device.type == "cpu" or _probe(ability, device.type))


@functools.lru_cache(maxsize=None)
def _bfloat16_faster(device_type: str) -> bool:
    """Whether bfloat16 GEMMs beat float32 by BF16_MIN_SPEEDUP on this device type. CUDA: every card with
    bfloat16 has tensor cores for it. Elsewhere a 512³ GEMM is timed once in each dtype (on CPUs bfloat16 is fast
    only with hardware support such as AMX or AVX512-BF16); a device without bfloat16 (the Atlas 300I Duo) says
    no. Its own generator: the caller's random stream is left alone."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    device = torch.device(device_type)
    if device_type != "cpu" and runtime(device) is None:  # nothing runs there to time (e.g. meta)
        return False
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0)).to(device)

    def best(dtype):
        m = a.to(dtype)
        torch.mm(m, m)  # warm-up
        times = []
        for _ in range(3):
            synchronize(device)
            start = time.perf_counter()
            torch.mm(m, m)
            synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times)

    try:
        return best(torch.float32) >= BF16_MIN_SPEEDUP * best(torch.bfloat16)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def gemm_dtype(device: torch.device) -> torch.dtype:
    """The dtype of fast mode's low-precision GEMMs (and of its calibration forwards): bfloat16 where the device
    computes it faster than float32, else float32."""
    return torch.bfloat16 if _bfloat16_faster(device.type) else torch.float32


@contextmanager
def factorisation_threads(device: torch.device):
    """Within it, a d_in x d_in factorisation runs as fast as the device allows: on one thread on CPUs (torch
    2.13's cholesky_inverse measured 1.3-2.8x slower on 2 threads than on one at 2048 and 4096 on a 2-core
    machine; issue 30); elsewhere nothing changes."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def float32_matmuls(allow_tf32: bool):
    """CUDA float32 GEMMs in full float32 (the default: parity with the CPU path and the SPEC) or, opted in,
    in TF32, whatever the caller's global setting; that setting is restored afterwards (other devices' GEMMs
    ignore it)."""
    matmul = torch.backends.cuda.matmul
    try:
        old = matmul.fp32_precision  # torch >= 2.9; mixing it with the legacy flag is an error there
    except AttributeError:
        old = None
    if old is None:
        old_flag = matmul.allow_tf32
        matmul.allow_tf32 = allow_tf32
        try:
            yield
        finally:
            matmul.allow_tf32 = old_flag
        return
    matmul.fp32_precision = "tf32" if allow_tf32 else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = old


def no_autocast(device: torch.device):
    """Within it, the device's GEMMs run in their inputs' dtype even inside a caller's autocast region. The
    statistics and the solvers compute in float32 (sums in float64) by contract; the calibration passes' bfloat16
    autocast around the statistics would otherwise round their products to bfloat16 (the native ops hold the
    same guard: csrc/admm.h, NoAutocast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


def statistics_device(device: torch.device) -> torch.device:
    """Where a layer's float64 statistics sums live: on the device, or on the CPU where it has no float64."""
    return device if supports("float64", device) else torch.device("cpu")


@contextmanager
def generic_kernels():
    """Within it, every op takes its plain-PyTorch path, as on a device without native kernels."""
    global _forced_generic
    old, _forced_generic = _forced_generic, True
    try:
        yield
    finally:
        _forced_generic = old


@contextmanager
def unsupported(*abilities: str):
    """Within it, the device is taken to lack these abilities (their ops fall back to the CPU)."""
    for ability in abilities:
        if ability not in ABILITIES:
            raise ValueError(f"unknown ability {ability!r}; known: {ABILITIES}")
    added = set(abilities) - _declared_unsupported
    _declared_unsupported.update(added)
    try:
        yield
    finally:
        _declared_unsupported.difference_update(added)
