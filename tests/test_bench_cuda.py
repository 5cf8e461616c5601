"""benchmarks/bench_cuda.py's own logic, run on the CPU at a toy size: the GPU benchmark has never had a GPU
in CI, and a script that fails on its first GPU would waste that session's device time."""
import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package

from benchmarks import bench_cuda  # noqa: E402


def test_smoke_run_on_cpu(capsys):
    argv = ["--device", "cpu", "--shapes", "48x64,40x32", "--repeats", "1", "--no-block", "--tokens", "256"]
    assert bench_cuda.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 48x64 |") or line.startswith("| 40x32 |")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 7 and cells[3].endswith("x") and cells[6].endswith("%")
        assert all(float(c) > 0 for c in (cells[1], cells[2], cells[4], cells[5]))


def test_without_a_gpu_it_says_so(capsys):
    if bench_cuda.torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert bench_cuda.main(["--no-block"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["4096", "4096x", "0x64", "64x64x2", "axb", ""])
def test_bad_shapes_are_refused(bad):
    with pytest.raises(argparse.ArgumentTypeError, match="OUTxIN"):
        bench_cuda.shape_list(bad)
    assert bench_cuda.shape_list("4096x11008,8x4") == [(4096, 11008), (8, 4)]
