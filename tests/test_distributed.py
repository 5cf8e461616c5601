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
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

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
    # Deep enough for one process's and two processes' float32 rounding differences to compound into different
    # masks with the statistics summed in float32 (0.9997 of mask entries equal with keep-bit rounding).
    deep = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=12,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(deep).save_pretrained(base / "deep")
    for name in ("llama", "mixtral", "deep"):
        tiny_tokenizer().save_pretrained(base / name)
    calib = base / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": TEXT[i:] + TEXT}) for i in range(0, 400, 25)) + "\n")
    return base


def prune_args(folders, model, out, *extra, samples=8):
    return ["prune", "--model", str(folders / model), "--calib", str(folders / "calib.jsonl"), "--out", str(out),
            "--num-samples", str(samples), "--seq-len", "32", "--device", "cpu", "--no-progress", "--sparse-ratio",
            "0.5", "--format", "hf", "--threads", "1", "--keep-bits", "none", *extra]


def run(args, ranks: int, script: Path | None = None, timeout: float = 240):
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)] if ranks > 1 else \
        [sys.executable]
    target = [str(script)] if script else ["-m", "admm_sparse"]
    return subprocess.run(launch + target + args, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


def assert_same_model(a_folder, b_folder):
    """Bitwise the same weights (so the same masks) and the same perplexities."""
    a, b = load_file(a_folder / "model.safetensors"), load_file(b_folder / "model.safetensors")
    assert a.keys() == b.keys()
    differ = [name for name in a if not torch.equal(a[name], b[name])]
    masks = sum(int((a[n] == 0).ne(b[n] == 0).sum()) for n in differ)
    assert not differ, f"{len(differ)} tensors differ ({masks} mask entries), first {differ[0]}"
    reports = [json.loads((f / "prune_report.json").read_text()) for f in (a_folder, b_folder)]
    assert [r["name"] for r in reports[0]["layers"]] == [r["name"] for r in reports[1]["layers"]]
    assert reports[0]["perplexity"] == reports[1]["perplexity"]
    return reports


@pytest.mark.parametrize("model,extra", [("llama", []), ("mixtral", []),
                                         # one layer per block: split over both ranks by its rows
                                         ("llama", ["--include", "*down_proj"]),
                                         ("llama", ["--include", "*down_proj", "--mask-structure", "2:4"]),
                                         ("llama", ["--dense-targets", "1", "--sequential"]),
                                         ("llama", ["--allocation", "error"])])
def test_two_ranks_give_the_model_of_one_process(folders, tmp_path, model, extra):
    one = run(prune_args(folders, model, tmp_path / "one", *extra), 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(prune_args(folders, model, tmp_path / "two", *extra), 2)
    assert two.returncode == 0, two.stderr[-3000:]
    reports = assert_same_model(tmp_path / "one", tmp_path / "two")
    assert reports[1]["processes"] == 2 and reports[0]["processes"] == 1
    for a, b in zip(reports[0]["layers"], reports[1]["layers"]):
        assert a["tokens"] == b["tokens"] and a["sparsity"] == b["sparsity"], a["name"]
        assert "split_over" not in a, a["name"]
        if "--include" in extra:  # down_proj alone in its block: both ranks share it
            assert b["split_over"] == 2, b["name"]


@pytest.mark.parametrize("extra", [["--keep-bits", "2"], [], ["--mode", "fast", "--keep-bits", "2"], ["--mode", "fast"]],
                         ids=["seed-keepbits", "seed", "fast-keepbits", "fast"])
def test_a_deep_model_is_bitwise_the_same_from_two_ranks(folders, tmp_path, extra):
    """12 blocks, where summation-order differences of float32 statistics used to flip near-tied mask and
    keep-bit choices and grow with depth; each window's products are the same on any rank and their float64
    sums round to the same float32 statistics, so nothing differs."""
    args = [prune_args(folders, "deep", tmp_path / out, *extra, samples=16) for out in ("one", "two")]
    for ranks, arg in zip((1, 2), args):
        done = run(arg, ranks)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_model(tmp_path / "one", tmp_path / "two")


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
