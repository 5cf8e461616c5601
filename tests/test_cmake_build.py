"""CMakeLists.txt builds the same native sources into a library that torch.ops.load_library() loads."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_loads_and_runs(tmp_path):
    configure = ["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 f"-DPython_EXECUTABLE={sys.executable}", "-DADMM_SPARSE_CUDA=OFF"]
    for cmd in (configure, ["cmake", "--build", str(tmp_path), "-j2"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    library = next(tmp_path.glob("libadmm_sparse_ops.*"))
    # A fresh interpreter: this one already has admm_sparse._C's registrations.
    probe = (f"import torch; torch.ops.load_library({str(library)!r}); "
             "v = torch.tensor([3., -1., 1., 2., -1., 0.]); "
             "print(torch.ops.admm_sparse.prune_mask(v, 3).tolist())")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[False, True, True, False, False, True]"  # 0, then the first two tied 1s
