"""Whole prune jobs (admm_sparse.job): streamed from safetensors or in memory, sharded output, resume."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

from admm_sparse.cli import main
from admm_sparse.config import FloatSparseConfig
from admm_sparse.export import work_folder
from admm_sparse.job import prune_to_folder, streamable
from admm_sparse.source import LazySource
from test_export import TEXT, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def four_block_model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 4-block model saved in shards small enough that a block's tensors span two files."""
    path = tmp_path_factory.mktemp("model") / "tiny"
    four_block_model().save_pretrained(path, max_shard_size="30KB")
    tiny_tokenizer().save_pretrained(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({f for k, f in index.items() if k.startswith("model.layers.1.")}) == 2
    return path


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": TEXT[i:] + TEXT}) for i in range(0, 400, 50)) + "\n")
    return path


def windows(n=6, length=32, seed=3):
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def cli(model_dir, calib_file, out, *extra):
    return main(["prune", "--model", str(model_dir), "--calib", str(calib_file), "--out", str(out),
                 "--num-samples", "6", "--seq-len", "32", "--device", "cpu", "--no-progress", "--sparse-ratio",
                 "0.5", *extra])


def test_streaming_and_in_memory_give_bitwise_the_same_model(model_dir, tmp_path):
    assert streamable(model_dir) and not streamable(tmp_path)
    source = LazySource(model_dir)
    config = FloatSparseConfig(0.5)
    streamed = prune_to_folder(source.model, windows(), tmp_path / "streamed", config, fmt="hf", source=source,
                               eval_windows=windows(2, seed=5), progress=False)
    in_memory_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    in_memory = prune_to_folder(in_memory_model, windows(), tmp_path / "memory", config, fmt="hf",
                                eval_windows=windows(2, seed=5), progress=False)
    assert [r["name"] for r in streamed.rows] == [r["name"] for r in in_memory.rows] and len(streamed.rows) == 28
    a, b = tensors(tmp_path / "streamed"), tensors(tmp_path / "memory")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert streamed.perplexity_after == in_memory.perplexity_after
    assert streamed.perplexity_before == in_memory.perplexity_before != streamed.perplexity_after
    # Only one block was ever materialised: the skeleton is back on the meta device.
    assert all(p.is_meta for p in source.model.parameters())
    assert len(streamed.block_seconds) == 4 and streamed.peak_memory_bytes > 0


def test_sharded_output_loads_with_the_logits_of_the_unsharded(model_dir, calib_file, tmp_path):
    assert cli(model_dir, calib_file, tmp_path / "one", "--format", "hf") == 0
    assert cli(model_dir, calib_file, tmp_path / "many", "--format", "hf", "--shard-size", "20KB") == 0
    assert (tmp_path / "one" / "model.safetensors").is_file()
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").eval()
    many = AutoModelForCausalLM.from_pretrained(tmp_path / "many").eval()
    ids = windows(2)
    with torch.no_grad():
        assert torch.equal(one(ids).logits, many(ids).logits)
    report = json.loads((tmp_path / "many" / "prune_report.json").read_text())
    assert report["streamed"] and report["peak_memory_bytes"] > 0 and len(report["block_seconds"]) == 4
    assert report["perplexity"]["before"] > 0 and report["perplexity"]["text"].startswith("held-out last 10%")


def test_atlas_shards_load_back_for_eval(model_dir, calib_file, tmp_path, capsys):
    assert cli(model_dir, calib_file, tmp_path / "atlas", "--shard-size", "10KB") == 0
    assert (tmp_path / "atlas" / "quant_model_weights.safetensors.index.json").is_file()
    description = json.loads((tmp_path / "atlas" / "quant_model_description.json").read_text())
    assert sum(v == "W16A16S" for k, v in description.items() if k.endswith(".weight")) == 28
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "atlas"), "--text", str(calib_file), "--seq-len", "32",
                 "--num-windows", "2", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"] > 1


KILL_AFTER_BLOCKS = """
import os, signal, sys
from admm_sparse import resume
from admm_sparse.cli import main

saves = []
real_save = resume.ResumeState.save
def save_then_die(self, *args):
    real_save(self, *args)
    saves.append(1)
    if len(saves) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)  # as a power loss would: nothing cleans up
resume.ResumeState.save = save_then_die
sys.exit(main(sys.argv[2:]))
"""


def test_a_killed_run_resumes_to_bitwise_the_uninterrupted_result(model_dir, calib_file, tmp_path, capsys):
    args = ["--format", "atlas", "--shard-size", "15KB"]
    assert cli(model_dir, calib_file, tmp_path / "whole", *args) == 0
    out = tmp_path / "out"
    command = ["prune", "--model", str(model_dir), "--calib", str(calib_file), "--out", str(out), "--num-samples",
               "6", "--seq-len", "32", "--device", "cpu", "--no-progress", "--sparse-ratio", "0.5", *args]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_BLOCKS, "2", *command], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and work_folder(out).is_dir()

    assert cli(model_dir, calib_file, out, *args) == 2  # neither --resume nor --force: refused
    assert "--resume" in capsys.readouterr().err
    assert cli(model_dir, calib_file, out, *args, "--sparse-ratio", "0.4", "--resume") == 2
    assert "with a different config;" in capsys.readouterr().err
    assert cli(model_dir, calib_file, out, *args, "--num-samples", "5", "--resume") == 2
    assert "with a different calibration windows;" in capsys.readouterr().err

    assert cli(model_dir, calib_file, out, *args, "--resume") == 0
    assert not work_folder(out).exists()
    whole, resumed = tensors(tmp_path / "whole"), tensors(out)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    for name in ("quant_model_description.json", "quant_model_weights.safetensors.index.json"):
        assert (out / name).read_text() == (tmp_path / "whole" / name).read_text()
    reports = [json.loads((folder / "prune_report.json").read_text()) for folder in (tmp_path / "whole", out)]
    for key in ("layers", "perplexity", "float16_check", "summary"):
        strip = [[{k: v for k, v in row.items() if k != "seconds"} for row in r[key]] if key == "layers" else
                 {k: v for k, v in r[key].items() if k != "seconds"} for r in reports]
        assert strip[0] == strip[1], key


def test_resume_without_an_interrupted_run_and_force_starts_over(model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(model_dir, calib_file, out, "--resume") == 2
    assert "no interrupted run" in capsys.readouterr().err
    work_folder(out).mkdir()
    (work_folder(out) / "junk").write_text("x")
    assert cli(model_dir, calib_file, out, "--force") == 0
    assert not work_folder(out).exists() and not (out / "junk").exists()
