"""Builds csrc's CUDA kernels for the CPU emulator of emulator.h, as the op namespace admm_sparse_emulated.

The sources are copied and rewritten mechanically (checked after rewriting, so that a change in csrc the
rewrite no longer fits fails loudly instead of testing something else):
  - `kernel<<<grid, block, smem, stream>>>(args)` -> `::cuda_emulator::launch("kernel", {bound}, [&] {
    kernel(args); }, grid, block, smem, stream)`, bound being the kernel's __launch_bounds__ (0 if none),
    which a launch with more threads per block fails, as on a GPU;
  - the op library admm_sparse -> admm_sparse_emulated, and the CUDA kernels registered for the CPU key, so
    CPU tensors stand in for CUDA ones and nothing but the CUDA kernels implements the ops (csrc/cpu is
    not built in);
  - `__shared__ T name[N];` -> a reference to an array the emulator fills with 0xff before each block;
  - `.is_cuda()` -> `.is_cpu()` in the CUDA sources (their device checks), and their `at::empty` -> the
    emulator's 0xff-filled one.
Everything else is csrc's code as it is, compiled by the host compiler with the emulator's headers first.

Variants, chosen by the environment (each in its own build folder; one per process, as they register the
same ops):
  - CUDA_EMULATOR_SANITIZE=address: an AddressSanitizer build (the process must run with libasan
    preloaded; see test_cuda_emulator.py): a kernel's read or write outside a tensor then stops the run
    with a report, where on a GPU it would be an illegal memory access;
  - CUDA_EMULATOR_FIBERS=ucontext: glibc's ucontext switches the fibers, as off x86-64, instead of
    fiber.cpp's stack switch.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NAMESPACE = "admm_sparse_emulated"
SANITIZE_ENV = "CUDA_EMULATOR_SANITIZE"
FIBERS_ENV = "CUDA_EMULATOR_FIBERS"

LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<(.*?)>>>\(", re.S)
SHARED = re.compile(r"__shared__\s+([A-Za-z_][\w:]*(?:\s+[A-Za-z_][\w:]*)*?)\s+(\w+)\[([^\]]+)\];")
BOUNDS = re.compile(r"__launch_bounds__\(([^()]*)\)\s*(\w+)\s*\(")


def launch_bounds(texts) -> dict[str, str]:
    """Kernel name -> its __launch_bounds__ expression (maximum threads per block)."""
    return {name: expr for text in texts for expr, name in BOUNDS.findall(text)}


def rewrite_launches(text: str, origin: str, bounds: dict[str, str]) -> str:
    out, pos, count = [], 0, 0
    for match in LAUNCH.finditer(text):
        if match.start() < pos:
            continue
        start = match.end()  # just past the "(" of the arguments
        depth, end = 1, start
        while depth:
            if end >= len(text):
                raise RuntimeError(f"{origin}: unbalanced arguments of the launch at offset {match.start()}")
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        name, config, args = match.group(1), match.group(2), text[start:end - 1]
        bound = bounds.get(name.split("<")[0], "0")
        out += [text[pos:match.start()],
                f'::cuda_emulator::launch("{name}", {{{bound}}}, [&] {{ {name}({args}); }}, {config})']
        pos, count = end, count + 1
    out.append(text[pos:])
    result = "".join(out)
    if result.count("<<<") or text.count("<<<") != count:
        raise RuntimeError(f"{origin}: a kernel launch the emulator's rewrite does not understand")
    return result


def rewrite_shared(text: str, origin: str) -> str:
    result = SHARED.sub(lambda m: f"{m[1]} (&{m[2]})[{m[3]}] = ::cuda_emulator::shared_array<{m[1]}[{m[3]}], "
                                  "__COUNTER__>();", text)
    if "__shared__" in result:
        raise RuntimeError(f"{origin}: a __shared__ declaration the emulator's rewrite does not understand "
                           "(it takes `__shared__ TYPE NAME[SIZE];`)")
    return result


def rewrite_registrations(text: str, origin: str) -> str:
    """The op library renamed, and the CUDA kernels registered for the CPU key."""
    text = text.replace("TORCH_LIBRARY_IMPL(admm_sparse, CUDA,", f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU,")
    text = re.sub(r"\b(TORCH_LIBRARY(?:_IMPL|_FRAGMENT)?)\(admm_sparse,", rf"\1({NAMESPACE},", text)
    if re.search(r"TORCH_LIBRARY\w*\(\s*admm_sparse\b", text) or re.search(r"TORCH_LIBRARY_IMPL\([^)]*\bCUDA\b", text):
        raise RuntimeError(f"{origin}: an op registration the emulator's rewrite does not understand")
    return text


def rewrite(path: Path, bounds: dict[str, str]) -> str:
    text = rewrite_registrations(path.read_text(), str(path))
    if path.suffix in (".cu", ".cuh"):
        text = rewrite_shared(rewrite_launches(text, str(path), bounds), str(path))
        # Their device checks accept the CPU tensors that stand in for CUDA ones; their fresh tensors
        # start as garbage, as device memory does.
        text = text.replace(".is_cuda()", ".is_cpu()").replace("at::empty(", "::cuda_emulator::uninitialised(")
    return text


def write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)



def load():
    """Builds (incrementally) and loads the emulated library; returns torch.ops.admm_sparse_emulated."""
    sanitize = os.environ.get(SANITIZE_ENV, "")
    if sanitize not in ("", "address"):
        raise RuntimeError(f"{SANITIZE_ENV}={sanitize!r}: the emulator's sanitized build supports 'address' only")
    fibers = os.environ.get(FIBERS_ENV, "")
    if fibers not in ("", "ucontext"):
        raise RuntimeError(f"{FIBERS_ENV}={fibers!r}: leave it unset, or 'ucontext'")
    variant = ("_asan" if sanitize else "") + ("_ucontext" if fibers else "")
    build_root = REPO / "build" / ("cuda_emulator" + variant)
    src = build_root / "csrc"
    sources = []
    cuda_files = sorted((REPO / "csrc" / "cuda").glob("*.cu*")) + [HERE / "selftest.cu"]
    bounds = launch_bounds(p.read_text() for p in cuda_files)
    for path in sorted((REPO / "csrc").rglob("*")):
        if path.is_dir() or path.suffix not in (".cpp", ".h", ".cu", ".cuh"):
            continue
        relative = path.relative_to(REPO / "csrc")
        if relative.parts[0] == "cpu":
            continue  # the CPU kernels stay out: the CUDA ones must be what runs
        target = src / relative
        if path.suffix == ".cu":
            target = target.with_name(path.stem + "_cu.cpp")  # the host compiler, not nvcc
        write_if_changed(target, rewrite(path, bounds))
        if target.suffix == ".cpp":
            sources.append(str(target))
    # The emulator's own pieces: its configuration op, and the kernels that test the emulator itself.
    selftest = src / "emulator_selftest_cu.cpp"
    write_if_changed(selftest, rewrite(HERE / "selftest.cu", bounds))
    sources += [str(HERE / "fiber.cpp"), str(HERE / "control.cpp"), str(selftest)]
    obj_dir = build_root / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)
    # -ffp-contract=off: the kernels' float ops round one at a time, as on the GPU with _rn intrinsics.
    # Hidden visibility: nothing here may bind to admm_sparse._C's same-named symbols, or they to these.
    cflags = ["-ffp-contract=off", "-fopenmp", "-fvisibility=hidden"]
    ldflags = ["-fopenmp"]
    if sanitize:
        cflags += ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    else:
        cflags += ["-O2"]
    if fibers:
        cflags += ["-DCUDA_EMULATOR_UCONTEXT"]
    cpp_extension.load(
        name="admm_sparse_cuda_emulated" + variant,
        sources=sources,
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(HERE / "include"), str(src)],
        build_directory=str(obj_dir),
        is_python_module=False,
    )
    return getattr(torch.ops, NAMESPACE)


if __name__ == "__main__":  # python tests/cuda_emulator/build.py: build once, e.g. to see compiler errors
    print(load())
