"""Every csrc/cuda/*.cu must compile with nvcc against the installed torch's headers.

Runs wherever nvcc is on PATH, GPU or not, so a CUDA kernel that does not even compile is caught on a
CPU-only machine. Flags mirror what setup.py's CUDAExtension passes (torch's common nvcc flags plus
the project's own); it checks compilation only, not linking or running.
"""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

REPO = Path(__file__).resolve().parent.parent
CU_FILES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
# setup.py's nvcc flags (keep in step with it), minus -O3: optimisation finds no extra compile errors.
PROJECT_NVCC_FLAGS = ["--fmad=false", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
TIMEOUT_S = 600


def nvcc_command(source: Path, output: Path) -> list[str]:
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(REPO / "csrc")]
    defines = [
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DTORCH_EXTENSION_NAME=_C",
    ]
    # A CPU build of torch ships c10/cuda headers without their generated config header; on Linux it
    # only holds an export macro for Windows, so skipping it changes nothing.
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in cpp_extension.include_paths()):
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return [
        "nvcc", "-c", str(source), "-o", str(output),
        "-std=c++17", "-Xcompiler", "-fPIC",
        # "Default bit-field initializer is C++20" in torch's own headers: noise, not our error.
        "-diag-suppress=3306", "-Xcompiler", "-Wno-c++20-extensions",
        "--threads", "2",  # the two -gencode targets in parallel
        *cpp_extension.COMMON_NVCC_FLAGS, *PROJECT_NVCC_FLAGS,
        *defines, *(f"-I{p}" for p in includes),
    ]  # fmt: skip


def compile_one(source: Path, out_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    cmd = nvcc_command(source, out_dir / (source.stem + ".o"))
    return source, subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_sources_compile(tmp_path):
    assert CU_FILES, "no csrc/cuda/*.cu files found"
    workers = max(1, min(len(CU_FILES), (os.cpu_count() or 1) // 2))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda s: compile_one(s, tmp_path), CU_FILES))
    failures = [
        f"{src.relative_to(REPO)}: nvcc exited with {proc.returncode}\n{proc.stderr[-20000:]}"
        for src, proc in results
        if proc.returncode != 0
    ]
    if failures:
        pytest.fail("CUDA compile check failed:\n" + "\n\n".join(failures), pytrace=False)
