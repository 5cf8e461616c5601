"""Atlas W16A16S (SPEC §5) and Hugging Face exports: files, entries, dtypes, round trips, atomicity."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from admm_sparse import export as export_pkg
from admm_sparse.builtin import load_model
from admm_sparse.config import FloatSparseConfig
from admm_sparse.export import atlas, export_model, shards
from admm_sparse.pipeline import prune_model

TEXT = "The quick brown fox jumps over the lazy dog; pruning keeps the large weights. " * 20



def tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")


def tiny_model(dtype=torch.float32, tie=False, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         mlp_bias=True, tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


@pytest.fixture(scope="module")
def pruned():
    model = tiny_model()
    ids = torch.randint(0, 300, (8, 64), generator=torch.Generator().manual_seed(0))
    rows = prune_model(model, ids, FloatSparseConfig(0.3, ["*mlp*"]), progress=False)
    return model, [r["name"] for r in rows]


def test_atlas_folder(pruned, tmp_path):
    model, names = pruned
    out = export_model(model, tmp_path / "out", names, "atlas", tiny_tokenizer(), report={"x": 1})
    files = {p.name for p in out.iterdir()}
    assert {"quant_model_weights.safetensors", "quant_model_description.json", "config.json",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json", "prune_report.json"} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in out.iterdir())  # not private temp files

    tensors = load_file(out / "quant_model_weights.safetensors")
    state = model.state_dict()
    assert set(tensors) == set(state)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    for name, t in tensors.items():
        assert torch.equal(t, state[name].half()), name

    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc["version"] == "1.0.0" and desc["model_quant_type"] == "W16A16S"
    assert desc["metadata"] == {} and desc["group_size"] == 0 and desc["optional"] == {}
    entries = {k: v for k, v in desc.items() if k in state}
    assert len(desc) == len(state) + 5 and set(entries) == set(state)
    sparse = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    assert len(sparse) == 12
    assert {k for k, v in entries.items() if v == "W16A16S"} == sparse
    assert all(v == "FLOAT" for k, v in entries.items() if k not in sparse)

    for name in names:  # the exact zero count survives the float16 file
        w = tensors[f"{name}.weight"]
        assert int((w == 0).sum()) == int((state[f"{name}.weight"] == 0).sum()) >= int(w.numel() * 0.3)

    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and "quantization_config" not in config
    assert json.loads((out / "prune_report.json").read_text()) == {"x": 1}


def test_atlas_folder_loads_back(pruned, tmp_path):
    model, names = pruned
    export_model(model, tmp_path / "out", names, "atlas", tiny_tokenizer())
    loaded, tokenizer = load_model(tmp_path / "out", "float32")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    half = tiny_model()
    half.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, half(ids).logits)
    assert tokenizer("the fox")["input_ids"] == tiny_tokenizer()("the fox")["input_ids"]


@pytest.mark.parametrize("tie", [False, True])
def test_hf_folder_round_trip_identical_logits(pruned, tmp_path, tie):
    model, names = pruned
    if tie:
        model = tiny_model(tie=True)
    export_model(model, tmp_path / "hf", names, "hf", tiny_tokenizer())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("fox")["input_ids"] == tiny_tokenizer()("fox")["input_ids"]


def test_tied_weights_are_stored_under_both_names(tmp_path):
    model = tiny_model(tie=True, dtype=torch.float16)
    export_model(model, tmp_path / "out", [], "atlas")
    tensors = load_file(tmp_path / "out" / "quant_model_weights.safetensors")
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])


def test_bfloat16_becomes_float16(tmp_path):
    model = tiny_model(dtype=torch.bfloat16)
    model.config.dtype = torch.bfloat16
    export_model(model, tmp_path / "out", [], "atlas")
    tensors = load_file(tmp_path / "out" / "quant_model_weights.safetensors")
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert torch.equal(tensors["model.norm.weight"], model.model.norm.weight.half())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config.get("dtype", "float16") == "float16"


def test_float16_overflow_names_the_tensor_and_writes_nothing(tmp_path):
    model = tiny_model(dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = 1e6
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*65504"):
        export_model(model, tmp_path / "out", [], "atlas")
    assert list(tmp_path.iterdir()) == []


def test_values_that_round_into_range_are_fine():
    assert atlas.to_float16("x", torch.tensor([65519.0, -65504.0])).isfinite().all()
    with pytest.raises(ValueError, match="'x'"):
        atlas.to_float16("x", torch.tensor([65520.0]))
    assert atlas.to_float16("x", torch.tensor([float("inf")])).isinf().all()  # already inf: not an overflow


def test_description_rejects_unknown_tensors_and_layers(tmp_path):
    with pytest.raises(ValueError, match="no.such"):
        atlas.atlas_description(["a.weight"], ["no.such.weight"])
    with pytest.raises(ValueError, match="no.such"):
        export_model(tiny_model(), tmp_path / "out", ["no.such"], "atlas")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_export_leaves_no_partial_folder(pruned, tmp_path, monkeypatch, exc):
    model, names = pruned

    def half_written(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise exc("interrupted while writing")

    monkeypatch.setattr(shards, "save_file", half_written)
    with pytest.raises(exc):
        export_model(model, tmp_path / "out", names, "atlas")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_forced_export_keeps_the_old_output(pruned, tmp_path, monkeypatch):
    model, names = pruned
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    monkeypatch.setattr(shards, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        export_model(model, tmp_path / "out", names, "atlas", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "old.txt").exists()


def test_refuses_to_overwrite_without_force(pruned, tmp_path):
    model, names = pruned
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--force"):
        export_model(model, tmp_path / "out", names, "hf")
    assert (tmp_path / "out" / "old.txt").read_text() == "old"
    export_model(model, tmp_path / "out", names, "hf", force=True)
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_refuses_to_write_over_the_input_model(pruned, tmp_path):
    model, names = pruned
    src = tmp_path / "models" / "src"
    src.mkdir(parents=True)
    for out in (src, tmp_path / "models"):
        with pytest.raises(ValueError, match="input model"):
            export_model(model, out, names, "hf", force=True, protect=[src])


def test_unknown_format(pruned, tmp_path):
    with pytest.raises(ValueError, match="atlas, hf"):
        export_model(pruned[0], tmp_path / "out", [], "onnx")


def test_gguf_quantization_entry_is_dropped():
    model = tiny_model()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    model.hf_quantizer, model.is_quantized = object(), True
    export_pkg.drop_gguf_quantization(model)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.hf_quantizer is None and model.is_quantized is False
