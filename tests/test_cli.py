"""`admm-sparse prune` / `admm-sparse eval` end to end on a tiny model folder (no download)."""
import hashlib
import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from admm_sparse.calib import calibration_windows, read_texts, tokenize
from admm_sparse.cli import main
from admm_sparse.export import shards
from test_export import TEXT, tiny_model, tiny_tokenizer



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture()
def files(tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": TEXT[i:] + TEXT}) for i in range(0, 400, 50)) + "\n")
    evaltext = tmp_path / "eval.txt"
    evaltext.write_text(TEXT * 3)
    config = tmp_path / "cfg.yaml"
    config.write_text('spec:\n  process:\n    - type: "float_sparse"\n      sparse_ratio: 0.4\n'
                      '      exclude: ["*self_attn*"]\n')
    return calib, evaltext, config


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def prune(model_dir, files, out, *extra):
    calib, _, config = files
    return main(["prune", "--model", str(model_dir), "--config", str(config), "--calib", str(calib),
                 "--out", str(out), "--num-samples", "32", "--seq-len", "64", "--device", "cpu", "--no-progress",
                 *extra])


def test_prune_atlas_end_to_end(model_dir, files, tmp_path, capsys):
    before = digest(model_dir)
    out = tmp_path / "out"
    assert prune(model_dir, files, out, "--eval-text", str(files[1]), "--eval-windows", "3") == 0
    stdout = capsys.readouterr().out
    table = [line for line in stdout.splitlines() if line.startswith("model.")]
    assert len(table) == 6 and all(".mlp." in line for line in table)
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["config"] == {"sparse_ratio": 0.4, "include": ["*"], "exclude": ["*self_attn*"],
                                 "mask_structure": "unstructured", "mode": "seed", "round_in_admm": None,
                                 "allow_tf32": False, "calibration_dtype": "auto", "keep_bits": 2,
                                 "keep_proportion": 0.02, "salience_bits": None,
                                 "reconstruct_epochs": 0, "reconstruct_lr": 3e-3, "reconstruct_dtype": "model",
                                 "reconstruct_schedule": "constant", "reconstruct_unit": "block",
                                 "distill_epochs": 0, "distill_lr": 3e-4, "distill_samples": 0,
                                 "distill_schedule": "constant",
                                 "dense_targets": 0.0, "sequential": False, "stream_memory": "device",
                                 "allocation": "uniform", "target_bits_per_weight": None}
    assert summary["summary"]["layers"] == 6
    assert summary["perplexity"]["windows"] == 3 and summary["perplexity"]["before"] > 1
    check = summary["float16_check"]
    assert check["ok"] and check["windows"] == 4 and 0 < check["max_abs"] < 100 and check["block"] is None

    report = json.loads((out / "prune_report.json").read_text())
    assert [r["name"] for r in report["layers"]] == [f"model.layers.{i}.mlp.{p}" for i in range(2)
                                                     for p in ("gate_proj", "up_proj", "down_proj")]
    assert report["calibration"]["windows"] == 32 and report["calibration"]["seq_len"] == 64

    tensors = load_file(out / "quant_model_weights.safetensors")
    desc = json.loads((out / "quant_model_description.json").read_text())
    original = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.float16
        layer = name.rsplit(".", 1)[0]
        if "mlp" in layer:
            assert desc[name] == "W16A16S"
            if name.endswith("weight"):
                assert int((tensor == 0).sum()) == int(tensor.numel() * 0.4), name
        else:
            assert desc[name] == "FLOAT"
            assert torch.equal(tensor, original[name].half()), name  # untouched, excluded
    assert digest(model_dir) == before  # the input model's files are never modified


def test_float16_overflow_is_reported_by_prune_and_by_eval(files, tmp_path, capsys):
    model = tiny_model()
    with torch.no_grad():  # block 1's MLP output (~1e5) overflows float16, not float32; its weights fit float16
        model.model.layers[1].mlp.up_proj.weight *= 1e3
        model.model.layers[1].mlp.down_proj.weight *= 3e4
    model_dir, out = tmp_path / "big", tmp_path / "out"
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    with pytest.warns(UserWarning, match=r"the pruned model overflows float16.*block 1 is the first whose output is "
                                         r"not finite in float16: first in model\.layers\.1\.mlp\.down_proj"):
        assert prune(model_dir, files, out) == 0
    capsys.readouterr()
    check = json.loads((out / "prune_report.json").read_text())["float16_check"]
    assert (check["ok"], check["block"], check["module"], check["windows"]) == (False, 1, "model.layers.1.mlp.down_proj",
                                                                                 4)
    assert (out / "quant_model_weights.safetensors").is_file()  # the export is still written

    evaluate = ["eval", "--model", str(out), "--text", str(files[1]), "--seq-len", "64", "--num-windows", "2",
                "--no-progress", "--device", "cpu"]
    assert main(evaluate) == 0  # float32 by default, although the Atlas folder stores float16
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["dtype"] == "float32" and 1 < result["perplexity"] < 1e4
    assert main(evaluate + ["--dtype", "float16"]) == 2
    assert ("error: the model's logits are not finite in float16 (perplexity nan): block 1 is the first whose output "
            "is not finite in float16: first in model.layers.1.mlp.down_proj") in capsys.readouterr().err


@pytest.mark.parametrize("scale,flags,message", [
    (1e6, ["--dtype", "float16"], "not finite in float16 (perplexity nan): every block's output is finite in float16, "
                                  "so the overflow comes after the last block (the final norm or the output layer); "
                                  "leave --dtype out to measure it in float32\n"),
    (1e38, [], "not finite in float32 (perplexity inf): every block's output is finite in float32, so the overflow "
               "comes after the last block (the final norm or the output layer)\n"),
])
def test_eval_error_when_only_the_output_layer_overflows(files, tmp_path, capsys, scale, flags, message):
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight *= scale
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    assert main(["eval", "--model", str(tmp_path / "m"), "--text", str(files[1]), "--seq-len", "64",
                 "--num-windows", "2", "--no-progress", "--device", "cpu", *flags]) == 2
    assert capsys.readouterr().err.endswith(message)


def test_prune_hf_round_trip_and_eval_command(model_dir, files, tmp_path, capsys):
    out = tmp_path / "hf"
    assert prune(model_dir, files, out, "--format", "hf") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["float16_check"] is None  # Atlas only
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ups = [m.weight for n, m in loaded.named_modules() if n.endswith("up_proj")]
    assert len(ups) == 2 and all(int((w == 0).sum()) == int(w.numel() * 0.4) for w in ups)
    assert main(["eval", "--model", str(out), "--text", str(files[1]), "--seq-len", "64", "--num-windows", "2",
                 "--no-progress", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["windows"] == 2 and result["perplexity"] > 1 and result["dtype"] == "float32"


def test_perplexity_defaults_to_the_held_out_end_of_the_calibration_text(model_dir, files, tmp_path, monkeypatch,
                                                                        capsys):
    from admm_sparse import cli

    streams = []
    monkeypatch.setattr(cli, "calibration_windows", lambda ids, *a: streams.append(ids) or calibration_windows(ids, *a))
    assert prune(model_dir, files, tmp_path / "out", "--format", "hf") == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    full = tokenize("\n\n".join(read_texts(files[0])), tiny_tokenizer())
    assert full.numel() == 8777 and streams[0].numel() == 8777 - 877  # the windows come from the first 90% only
    assert ppl["text"] == f"held-out last 10% of {files[0]}" and ppl["windows"] == 877 // 64
    assert 1 < ppl["before"] < 1e4 and 1 < ppl["after"] < 1e4

    assert prune(model_dir, files, tmp_path / "out2", "--format", "hf", "--eval-windows", "0") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"] is None
    assert streams[1].numel() == 8777  # nothing is held out when nothing is measured


def test_held_out_end_shorter_than_a_window_warns_and_calibrates_on_all(model_dir, files, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text(TEXT)  # 580 tokens: the last 58 are less than one window of 64
    with pytest.warns(UserWarning, match=f"the held-out last 10% of {short} has 58 tokens, fewer than one window "
                                         "of 64: no perplexity is measured"):
        assert prune(model_dir, (short,) + files[1:], tmp_path / "out", "--format", "hf") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"] is None


def test_mask_structure_and_mode_flags_override_the_config(model_dir, files, tmp_path, capsys):
    out = tmp_path / "nm"
    assert prune(model_dir, files, out, "--mask-structure", "2:4", "--mode", "quality") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 2:4 fixes the ratio at 0.5: the config's 0.4 gives way; its exclude stays
    assert summary["config"] == {"sparse_ratio": 0.5, "include": ["*"], "exclude": ["*self_attn*"],
                                 "mask_structure": "2:4", "mode": "quality", "round_in_admm": None,
                                 "allow_tf32": False, "calibration_dtype": "auto", "keep_bits": 2,
                                 "keep_proportion": 0.02, "salience_bits": None,
                                 "reconstruct_epochs": 0, "reconstruct_lr": 3e-3, "reconstruct_dtype": "model",
                                 "reconstruct_schedule": "constant", "reconstruct_unit": "block",
                                 "distill_epochs": 0, "distill_lr": 3e-4, "distill_samples": 0,
                                 "distill_schedule": "constant",
                                 "dense_targets": 0.0, "sequential": False, "stream_memory": "device",
                                 "allocation": "uniform", "target_bits_per_weight": None}
    report = json.loads((out / "prune_report.json").read_text())
    assert len(report["layers"]) == 6 and all(r["mode"] == "quality" for r in report["layers"])
    tensors = load_file(out / "quant_model_weights.safetensors")
    for name in (f"model.layers.{i}.mlp.{p}.weight" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")):
        w = tensors[name]
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all() and int((w == 0).sum()) >= w.numel() // 2, name  # the export keeps 2:4 exactly


def test_allow_tf32_flag_reaches_the_config(model_dir, files, tmp_path, capsys):
    assert prune(model_dir, files, tmp_path / "out", "--allow-tf32", "--format", "hf") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["config"]["allow_tf32"] is True  # a no-op on this CPU, passed to every layer's pruner


def test_block_reconstruction_flags_reach_the_loop_and_the_report(model_dir, files, tmp_path, capsys):
    out = tmp_path / "out"
    assert prune(model_dir, files, out, "--reconstruct-epochs", "2", "--reconstruct-lr", "0.01", "--format", "hf") == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert (summary["config"]["reconstruct_epochs"], summary["config"]["reconstruct_lr"]) == (2, 0.01)
    blocks = json.loads((out / "prune_report.json").read_text())["reconstruction"]
    assert [b["block"] for b in blocks] == ["model.layers.0", "model.layers.1"]
    assert all(b["heldout_after"] <= b["heldout_before"] and b["epochs"] <= 2 for b in blocks)
    assert sum(line.startswith("reconstructed model.layers.") for line in stdout.splitlines()) == 2


def test_distillation_loads_a_safetensors_folder_whole_and_reports_the_fit(model_dir, files, tmp_path, capsys):
    out = tmp_path / "out"
    assert prune(model_dir, files, out, "--distill-epochs", "2", "--distill-lr", "0.003", "--distill-samples", "3",
                 "--eval-text", str(files[1]), "--eval-windows", "2") == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert (summary["config"]["distill_epochs"], summary["config"]["distill_lr"]) == (2, 0.003)
    assert summary["config"]["distill_samples"] == 3
    report = json.loads((out / "prune_report.json").read_text())
    assert report["streamed"] is False  # distillation fits the whole model: the folder is loaded, not streamed
    fit = report["distillation"]
    assert fit["heldout_after"] <= fit["heldout_before"] and fit["epochs"] <= 2
    assert fit["sampled_batches"] >= 1 and fit["sampling_seconds"] > 0
    assert sum(line.startswith("distilled: KL") and "sampled from the dense model" in line
               for line in stdout.splitlines()) == 1
    assert prune(model_dir, files, tmp_path / "again", "--distill-epochs", "2", "--resume") == 2
    assert "no state to resume from" in capsys.readouterr().err


def test_n_m_that_does_not_divide_a_layer_leaves_it_dense_with_a_warning(model_dir, files, tmp_path, capsys):
    # gate/up have 32 inputs, down 64: 32:64 fits only down_proj
    with pytest.warns(UserWarning, match=r"in_features divisible by 64; left dense: .*gate_proj"):
        assert prune(model_dir, files, tmp_path / "out", "--mask-structure", "32:64", "--format", "hf") == 0
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert [r["name"] for r in report["layers"]] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize("flags,message", [(["--mask-structure", "2-4"], "mask_structure"),
                                           (["--mask-structure", "2:4", "--sparse-ratio", "0.3"], "contradicts"),
                                           (["--sparse-ratio", "1.0"], "sparse_ratio"),
                                           (["--reconstruct-epochs", "-1"], "reconstruct_epochs"),
                                           (["--reconstruct-lr", "0"], "reconstruct_lr"),
                                           (["--distill-epochs", "-1"], "distill_epochs")])
def test_bad_structure_flags_exit_2(model_dir, files, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert prune(model_dir, files, out, *flags) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_dry_run_lists_layers_and_writes_nothing(model_dir, files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", "--model", str(model_dir), "--config", str(files[2]), "--out", str(out), "--dry-run"]) == 0
    stdout = capsys.readouterr().out
    assert "model.layers.0.mlp.gate_proj" in stdout and "64 x 32" in stdout
    assert "6 of 15 prunable layers would be pruned" in stdout and "q_proj" not in stdout
    assert not out.exists()


def test_include_patterns_and_unused_pattern_warning(model_dir, files, tmp_path, capsys):
    config = tmp_path / "inc.yaml"
    config.write_text('spec:\n  process:\n    - type: "float_sparse"\n'
                      '      include: ["model.layers.1.*proj", "*nope*"]\n')
    with pytest.warns(UserWarning, match=r"\*nope\*"):
        assert main(["prune", "--model", str(model_dir), "--config", str(config), "--dry-run"]) == 0
    stdout = capsys.readouterr().out
    assert "7 of 15" in stdout and "model.layers.0" not in stdout


@pytest.mark.parametrize("patterns,flags,cause", [
    ('exclude: ["*"]', [], "include ['*'] and exclude ['*'] match none of the model's 14 prunable layers "
                           "(named"),
    ('include: ["*mpl*"]', [], "include ['*mpl*'] and exclude [] match none"),
    ('include: ["*gate_proj"]', ["--mask-structure", "32:64"], "layers that mask_structure '32:64' fits (named"),
])
def test_config_that_selects_nothing_is_an_error_before_calibration(model_dir, tmp_path, capsys, patterns, flags,
                                                                    cause):
    config = tmp_path / "none.yaml"
    config.write_text(f'spec:\n  process:\n    - type: "float_sparse"\n      {patterns}\n')
    out = tmp_path / "out"
    # The calibration file does not exist: the selection is checked first.
    args = ["prune", "--model", str(model_dir), "--config", str(config), "--calib", str(tmp_path / "missing.txt"),
            "--out", str(out), *flags]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unused-pattern warning of the typo
        assert main(args) == 2
    err = capsys.readouterr().err
    assert f"the config {config} selects no layer to prune: " in err and cause in err
    assert "'model.layers.0.self_attn.q_proj'" in err and "'model.layers.0.mlp.down_proj'" in err
    assert "fix the patterns" in err and not out.exists()


def test_errors_exit_2_with_a_message_and_no_output(model_dir, files, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec:\n  process:\n    - type: float_sparse\n      sparse_ratio: 3\n")
    out = tmp_path / "out"
    assert main(["prune", "--model", str(model_dir), "--config", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "sparse_ratio" in err and not out.exists()

    assert prune(model_dir, (tmp_path / "missing.txt",) + files[1:], out) == 2
    assert "missing.txt" in capsys.readouterr().err and not out.exists()

    out.mkdir()
    assert prune(model_dir, files, out) == 2
    assert "--force" in capsys.readouterr().err

    assert prune(model_dir, files, model_dir, "--force") == 2
    assert "input model" in capsys.readouterr().err


def test_interrupt_during_export_leaves_nothing(model_dir, files, tmp_path, monkeypatch, capsys):
    # Interrupted while writing the first block: nothing to resume from, so nothing is left.
    monkeypatch.setattr(shards, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert prune(model_dir, files, tmp_path / "out") == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.jsonl", "cfg.yaml", "eval.txt"]


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "admm_sparse", "prune", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--dry-run" in done.stdout and "--num-samples" in done.stdout
