"""Pruning on several processes (torchrun, Gloo on CPU): the same model as one process, failures end all."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MixtralConfig

from admm_sparse.distributed import Group
from admm_sparse.export import work_folder
from test_export import TEXT, tiny_tokenizer
from test_job import four_block_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    four_block_model().save_pretrained(base / "llama")
    torch.manual_seed(0)
    mixtral = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=300, num_local_experts=4, num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(mixtral).save_pretrained(base / "mixtral")
    for name in ("llama", "mixtral"):
        tiny_tokenizer().save_pretrained(base / name)
    calib = base / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": TEXT[i:] + TEXT}) for i in range(0, 400, 50)) + "\n")
    return base


def prune_args(folders, model, out, *extra):
    return ["prune", "--model", str(folders / model), "--calib", str(folders / "calib.jsonl"), "--out", str(out),
            "--num-samples", "8", "--seq-len", "32", "--device", "cpu", "--no-progress", "--sparse-ratio", "0.5",
            "--format", "hf", "--threads", "1", "--keep-bits", "none", *extra]


def run(args, ranks: int, script: Path | None = None, timeout: float = 240):
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)] if ranks > 1 else \
        [sys.executable]
    target = [str(script)] if script else ["-m", "admm_sparse"]
    return subprocess.run(launch + target + args, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


def assert_same_model(a_folder, b_folder, rtol):
    a, b = load_file(a_folder / "model.safetensors"), load_file(b_folder / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name] == 0, b[name] == 0), name  # identical masks
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=rtol * a[name].abs().max().item(), msg=name)
    reports = [json.loads((f / "prune_report.json").read_text()) for f in (a_folder, b_folder)]
    assert [r["name"] for r in reports[0]["layers"]] == [r["name"] for r in reports[1]["layers"]]
    return reports


@pytest.mark.parametrize("model,extra", [("llama", []), ("mixtral", []),
                                         ("llama", ["--include", "*down_proj"]),  # fewer layers than ranks
                                         ("llama", ["--dense-targets", "1", "--sequential"]),
                                         ("llama", ["--allocation", "error"])])
def test_two_ranks_give_the_model_of_one_process(folders, tmp_path, model, extra):
    one = run(prune_args(folders, model, tmp_path / "one", *extra), 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(prune_args(folders, model, tmp_path / "two", *extra), 2)
    assert two.returncode == 0, two.stderr[-3000:]
    reports = assert_same_model(tmp_path / "one", tmp_path / "two", rtol=1e-4)
    assert reports[1]["processes"] == 2 and reports[0]["processes"] == 1
    assert reports[0]["perplexity"]["before"] == pytest.approx(reports[1]["perplexity"]["before"], rel=1e-6)
    for a, b in zip(reports[0]["layers"], reports[1]["layers"]):
        assert a["tokens"] == b["tokens"] and a["sparsity"] == b["sparsity"], a["name"]


FAIL_ON_RANK_1 = """
import os, sys
from admm_sparse import layer
from admm_sparse.cli import main

if os.environ["RANK"] == "1":
    def fail(self, *args, **kwargs):
        if os.environ.get("DIE"):
            os._exit(3)  # dies without a word, as a killed process would
        raise ValueError("injected failure while pruning")
    layer.AdmmPruner.fasterprune = fail
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("die", [False, True])
def test_a_failing_rank_ends_every_rank_and_writes_nothing(folders, tmp_path, die):
    script = tmp_path / "fail.py"
    script.write_text(FAIL_ON_RANK_1)
    out = tmp_path / "out"
    start = time.perf_counter()
    env = {**ENV, "DIE": "1"} if die else ENV
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script),
                           *prune_args(folders, "llama", out, "--dist-timeout", "60")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert done.returncode != 0
    assert time.perf_counter() - start < 200
    assert not out.exists() and not work_folder(out).exists()
    if not die:
        assert "admm-sparse: error (rank 1 of 2): injected failure while pruning" in done.stderr
    else:
        assert "exitcode  : 3" in done.stderr and "rank      : 1" in done.stderr  # torchrun names the failed rank


def test_group_of_one_and_the_assignment_balances_cost():
    group = Group()
    assert group.split([1, 2, 3]) == [1, 2, 3] and group.assign([5.0, 1.0]) == [0, 0]
    group.rank, group.size = 1, 3
    assert group.split(list(range(7))) == [1, 4]
    owners = group.assign([10.0, 1.0, 1.0, 9.0, 2.0])  # largest first, each to the least loaded rank
    assert owners == [0, 2, 2, 1, 2]
