"""The GPU benchmarks' own logic (benchmarks/bench_cuda.py, bench_op_times.py and the LLaMA-2-70B prediction that
reads its times), run on the CPU at a toy size: CI has no GPU, and a script that fails on its first GPU would waste
that session's device time."""
import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package

from benchmarks import bench_cuda, bench_distributed, bench_op_times  # noqa: E402


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


def test_op_times_feed_the_70b_prediction(tmp_path, monkeypatch):
    """bench_op_times at 1/64 of LLaMA-2-70B's dimensions on the CPU, then the prediction from its file: the
    measured ADMM times are the ones used, and a rank count without split times is refused by name."""
    monkeypatch.setattr(bench_op_times, "OP_TIMES", tmp_path / "op_times.json")
    assert bench_op_times.main(["--device", "cpu", "--scale", "64", "--repeats", "1", "--ranks", "8,16", "--write"]) == 0
    measured = json.loads((tmp_path / "op_times.json").read_text())
    times = measured["seconds"]
    assert set(times["admm"]) == set(times["admm_split"]["8"]) == set(bench_op_times.LAYERS)
    assert all(t > 0 for op in ("forward", "statistics", "admm") for t in times[op].values())
    one = bench_distributed.llama70b(1, 1, measured)
    assert one["admm_down"] == times["admm"]["down"] and one["split"] == []
    assert one["admm"] == pytest.approx(sum(times["admm"].values()))
    eight = bench_distributed.llama70b(8, 1, measured)
    for name in eight["split"]:  # a split layer costs its measured share on the most loaded rank
        assert eight["admm"] >= times["admm_split"]["8"][name]
    monkeypatch.setattr(bench_distributed, "OP_TIMES", tmp_path / "op_times.json")
    text = bench_distributed.prediction_70b()
    assert "per-op times measured on one cpu" in text and "| ADMM, 1/16 of the rows |" in text
    del measured["seconds"]["admm_split"]["16"]
    with pytest.raises(ValueError, match="--ranks 16"):
        bench_distributed.llama70b(16, 2, measured)
