"""Builds admm_sparse and its native extension admm_sparse._C.

The CUDA kernels are built where the installed torch has CUDA and nvcc is found (or when
ADMM_SPARSE_CUDA=1); ADMM_SPARSE_CUDA=0 forces a CPU-only build. Build with
`pip install --no-build-isolation -e .` so the extension is compiled against the torch you run.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    forced = os.environ.get("ADMM_SPARSE_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    # Relative paths: setuptools requires them for sources.
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -ffp-contract=off: the fused loops must round exactly like the reference's separate float ops.
    # -fopenmp: at::parallel_for is a header template that needs OpenMP in our own translation units.
    cxx = ["-O3", "-ffp-contract=off", "-fopenmp"]
    kwargs = dict(extra_link_args=["-fopenmp"], include_dirs=[os.path.join(HERE, "csrc")])
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "--fmad=false",
                "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        return CUDAExtension("admm_sparse._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    return CppExtension("admm_sparse._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    name="admm_sparse",
    version="0.1.0",
    description="ADMM post-training pruning of nn.Linear weights (float_sparse / W16A16S) with a native core",
    packages=find_packages(include=["admm_sparse", "admm_sparse.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "model": ["transformers>=4.56", "gguf>=0.10", "accelerate", "safetensors", "pyyaml", "tqdm",
                  "gensim", "zstandard", "brotli"],  # the last two: compressed sizes (admm_sparse.size)
        "test": ["pytest", "hypothesis"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["admm-sparse = admm_sparse.cli:main"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
