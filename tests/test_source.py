"""admm_sparse.source: a model materialised block by block from its safetensors files equals from_pretrained's."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GptOssConfig, LlamaConfig, Qwen3MoeConfig

from admm_sparse import source as source_module
from admm_sparse.plan import find_block_stack
from admm_sparse.source import INDEX_FILE, SINGLE_FILE, LazySource

VOCAB = 128


def save_tiny(config, folder, **save_kwargs):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, **save_kwargs)
    return folder


def llama_config(**overrides):
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, **overrides)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tied LLaMA in 40 KB shards: blocks span several files, lm_head.weight is not in the checkpoint."""
    return save_tiny(llama_config(tie_word_embeddings=True), tmp_path_factory.mktemp("llama"), max_shard_size="40KB")


def weight_map(folder):
    return json.loads((folder / INDEX_FILE).read_text())["weight_map"]


def materialize_blockwise(source):
    stack_name, blocks = find_block_stack(source.model)
    for i in range(len(blocks)):
        source.materialize(f"{stack_name}.{i}.", "cpu")
    source.materialize_outside(stack_name, "cpu")
    return source.model


def assert_same_model(model, ref):
    """Every state_dict tensor and buffer (rotary inv_freq included) bitwise equal, and equal logits."""
    state, ref_state = model.state_dict(), ref.state_dict()
    assert list(state) == list(ref_state)
    for name, tensor in ref_state.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    ref_buffers = dict(ref.named_buffers())
    assert dict(model.named_buffers()).keys() == ref_buffers.keys()
    for name, buffer in model.named_buffers():
        assert buffer.dtype == ref_buffers[name].dtype and torch.equal(buffer, ref_buffers[name]), name
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_blockwise_materialisation_equals_from_pretrained(llama_folder):
    files_of_block = {file for key, file in weight_map(llama_folder).items() if key.startswith("model.layers.1.")}
    assert len(files_of_block) > 1  # the case under test: one block split across shards
    assert "lm_head.weight" not in weight_map(llama_folder)  # tied: only embed_tokens is stored

    source = LazySource(llama_folder)
    assert all(p.is_meta for p in source.model.parameters())
    model = materialize_blockwise(source)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(llama_folder))


def test_materialize_reads_only_that_block_and_release_frees_it(llama_folder, monkeypatch):
    source = LazySource(llama_folder)
    read, real_read = [], source_module.read_tensor

    def recording_read(path, key, header, start):
        read.append(key)
        return real_read(path, key, header, start)

    monkeypatch.setattr(source_module, "read_tensor", recording_read)
    block = source.materialize("model.layers.1", "cpu")
    assert block is source.model.model.layers[1]
    assert sorted(read) == sorted(k for k in weight_map(llama_folder) if k.startswith("model.layers.1."))
    assert not any(p.is_meta for p in block.parameters())
    assert all(p.is_meta for n, p in source.model.named_parameters() if not n.startswith("model.layers.1."))

    source.release("model.layers.1")
    assert all(t.is_meta for t in [*source.model.parameters(), *source.model.buffers()])

    source.materialize_outside("model.layers", "cpu")
    assert not source.model.lm_head.weight.is_meta and not source.model.model.rotary_emb.inv_freq.is_meta
    assert all(p.is_meta for p in source.model.model.layers.parameters())
    source.release_outside("model.layers")
    assert all(t.is_meta for t in [*source.model.parameters(), *source.model.buffers()])
    assert source.model.lm_head.weight is source.model.model.embed_tokens.weight  # still tied


def test_materialized_tensors_do_not_follow_the_files(tmp_path, llama_folder):
    # Tensors read from a file's memory map would change (or fault) with the file; the model owns copies.
    folder = tmp_path / "copy"
    shutil.copytree(llama_folder, folder)
    block = LazySource(folder).materialize("model.layers.0", "cpu")
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    for file in sorted(set(weight_map(folder).values())):
        with open(folder / file, "r+b") as f:  # same size, every tensor's bytes zeroed in place
            header = 8 + int.from_bytes(f.read(8), "little")
            f.seek(0, 2)
            size = f.tell()
            f.seek(header)
            f.write(bytes(size - header))
    assert all(torch.equal(p, before[name]) for name, p in block.named_parameters())


def test_dtype_given(llama_folder):
    model = materialize_blockwise(LazySource(llama_folder, dtype="bfloat16"))
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.bfloat16))


def test_extra_checkpoint_keys_are_ignored_missing_ones_are_named(tmp_path):
    folder = save_tiny(llama_config(), tmp_path / "m")
    tensors = load_file(folder / SINGLE_FILE)
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8), "junk.weight": torch.ones(3)}
    save_file({**tensors, **extra}, folder / SINGLE_FILE, metadata={"format": "pt"})
    assert_same_model(materialize_blockwise(LazySource(folder)), AutoModelForCausalLM.from_pretrained(folder))

    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as error:
        LazySource(folder)
    assert str(folder) in str(error.value)


def test_dtype_from_the_weights_when_the_config_has_none(tmp_path):
    folder = save_tiny(llama_config(dtype="bfloat16"), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    del config["dtype"]
    (folder / "config.json").write_text(json.dumps(config))
    assert LazySource(folder).dtype == AutoModelForCausalLM.from_pretrained(folder).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float17'"):
        LazySource(folder, dtype="float17")
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ValueError, match="quantised weights"):
        LazySource(folder)


def test_shape_mismatch_and_missing_weights_are_errors(tmp_path):
    folder = save_tiny(llama_config(), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"mlp\.down_proj\.weight.*shape \[64, 128\].*\[64, 96\]"):
        LazySource(folder)
    (folder / SINGLE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LazySource(folder)


def test_fused_experts_are_stacked_as_from_pretrained(tmp_path):
    config = Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, num_experts=4,
                            num_experts_per_tok=2, tie_word_embeddings=False)
    folder = save_tiny(config, tmp_path / "moe", max_shard_size="8KB")
    on_disk = weight_map(folder)
    expert_keys = [f"model.layers.1.mlp.experts.{e}.{p}.weight" for e in range(4) for p in ("gate_proj", "up_proj")]
    assert set(expert_keys) <= on_disk.keys() and len({on_disk[k] for k in expert_keys}) > 1

    source = LazySource(folder)
    fused = "model.layers.1.mlp.experts.gate_up_proj"
    assert source.model.get_parameter(fused).shape == (4, 2 * 16, 32)  # [experts, gate rows + up rows, hidden]
    assert [key for _, key in source.index[fused]] == expert_keys  # expert order, gate before up
    assert_same_model(materialize_blockwise(source), AutoModelForCausalLM.from_pretrained(folder))


def test_modules_kept_in_float32(tmp_path):
    # GPT-OSS keeps its norms in float32 when loaded in float16 (_keep_in_fp32_modules), as from_pretrained does.
    config = GptOssConfig(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"])
    folder = save_tiny(config, tmp_path / "gptoss")
    model = materialize_blockwise(LazySource(folder, dtype=torch.float16))
    assert model.model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float16
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16))


def test_fingerprint_follows_the_files(tmp_path, llama_folder):
    folder = tmp_path / "copy"
    shutil.copytree(llama_folder, folder)
    first = LazySource(folder).fingerprint()
    assert LazySource(folder).fingerprint() == first
    shard = folder / weight_map(folder)["model.norm.weight"]
    tensors = load_file(shard)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].half()
    save_file(tensors, shard, metadata={"format": "pt"})
    assert LazySource(folder).fingerprint() != first
