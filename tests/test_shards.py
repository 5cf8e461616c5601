"""admm_sparse.export.shards: size-capped shards, the HF and Atlas layouts, resume after a killed run."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from admm_sparse.export import shards
from admm_sparse.export.shards import STATE_FILE, ShardWriter, hf_checkpoint_tensors, parse_size
from admm_sparse.source import LazySource
from archs import tiny_llama


def read_back(folder, fmt):
    """(list of (file, [tensor names in it]), {name: tensor}) of a finished folder, checked against its index."""
    single, index = {"hf": ("model.safetensors", "model.safetensors.index.json"),
                     "atlas": ("quant_model_weights.safetensors", "quant_model_weights.safetensors.index.json")}[fmt]
    if (folder / single).exists():
        assert not (folder / index).exists()
        files = [single]
    else:
        weight_map = json.loads((folder / index).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    layout, tensors = [], {}
    for file in files:
        content = load_file(folder / file)
        layout.append((file, list(content)))
        tensors.update(content)
    if len(files) > 1:
        index_data = json.loads((folder / index).read_text())
        assert index_data["weight_map"] == {name: file for file, names in layout for name in names}
        assert index_data["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert not (folder / STATE_FILE).exists()
    assert not list(folder.glob("*.tmp*")) and not list(folder.glob("*.partial*"))
    return layout, tensors


def floats(*counts):
    """Named float32 tensors of the given element counts (4 bytes each), distinct values."""
    return {f"t{i}": torch.arange(n, dtype=torch.float32) + 1000 * i for i, n in enumerate(counts)}


def write(folder, fmt, shard_size, *groups):
    writer = ShardWriter(folder, fmt, shard_size)
    for group in groups:
        writer.add(group)
    return writer.finish()


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("4096") == parse_size("4096B") == 4096
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("64KiB") == parse_size("64kiB") == 65536
    for junk in ("", "GB", "5 gigabytes", "5Gb", "-1GB", "0", 0, 1.5, None, True, "1e9"):
        with pytest.raises(ValueError, match="shard size"):
            parse_size(junk)


def test_exact_fit_stays_in_one_shard(tmp_path):
    tensors = floats(10, 15)  # 40 + 60 bytes = exactly 100
    assert write(tmp_path / "a", "hf", 100, tensors) == ["model.safetensors"]
    layout, back = read_back(tmp_path / "a", "hf")
    assert layout == [("model.safetensors", ["t0", "t1"])]
    assert all(torch.equal(back[k], v) for k, v in tensors.items())

    tensors = floats(10, 15, 1)  # one more byte would not fit
    assert write(tmp_path / "b", "hf", 100, tensors) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    assert read_back(tmp_path / "b", "hf")[0] == [("model-00001-of-00002.safetensors", ["t0", "t1"]),
                                                  ("model-00002-of-00002.safetensors", ["t2"])]


def test_added_tensors_are_snapshots(tmp_path):
    weight = torch.arange(8, dtype=torch.float32)
    writer = ShardWriter(tmp_path, "hf", "1MB")
    writer.add({"w": weight, "first_half": weight[:4], "w_again": weight})  # shared storage is fine too
    weight.zero_()  # the caller goes on changing its tensor
    with pytest.raises(ValueError, match="'gone'.*meta"):
        writer.add({"gone": torch.empty(3, device="meta")})
    writer.finish()
    back = read_back(tmp_path, "hf")[1]
    assert torch.equal(back["w"], torch.arange(8.0)) and torch.equal(back["first_half"], torch.arange(4.0))
    assert torch.equal(back["w_again"], torch.arange(8.0))


def test_a_tensor_larger_than_a_shard_gets_its_own(tmp_path):
    tensors = floats(10, 100, 10)  # 40, 400, 40 bytes
    write(tmp_path, "hf", "100B", {"t0": tensors["t0"]}, {"t1": tensors["t1"], "t2": tensors["t2"]})
    layout, back = read_back(tmp_path, "hf")
    assert [names for _, names in layout] == [["t0"], ["t1"], ["t2"]]
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_many_small_tensors(tmp_path):
    tensors = floats(*[2] * 100)  # 8 bytes each: 12 fit in 100 bytes
    write(tmp_path, "hf", 100, *({k: v} for k, v in tensors.items()))
    layout, back = read_back(tmp_path, "hf")
    order = list(tensors)
    assert [set(names) for _, names in layout] == [set(order[i:i + 12]) for i in range(0, 100, 12)]
    assert [file for file, _ in layout] == [f"model-{i:05d}-of-00009.safetensors" for i in range(1, 10)]
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def assert_same_logits(folder, ref_folder):
    ours, ref = AutoModelForCausalLM.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(ref_folder)
    ids = torch.randint(0, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


def test_hf_shards_load_like_save_pretrained(tmp_path):
    model = tiny_llama(3, hidden=64, vocab=128, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "ref")
    writer = ShardWriter(tmp_path / "out", "hf", "40KB")
    state = model.state_dict()
    for i in range(3):  # block by block, then the rest
        writer.add(hf_checkpoint_tensors(model, {k: v for k, v in state.items() if k.startswith(f"model.layers.{i}.")}))
    rest = hf_checkpoint_tensors(model, {k: v for k, v in state.items() if not k.startswith("model.layers.")})
    assert "lm_head.weight" not in rest  # tied to embed_tokens: save_pretrained leaves it out too
    writer.add(rest)
    assert len(writer.finish()) > 2
    model.config.save_pretrained(tmp_path / "out")
    assert_same_logits(tmp_path / "out", tmp_path / "ref")


def test_streaming_a_fused_expert_model_from_source_to_shards(tmp_path):
    # The block loop's path: materialise a block from the input's shards, write it, release it.
    config = Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64, num_experts=4,
                            num_experts_per_tok=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "in", max_shard_size="8KB")
    source = LazySource(tmp_path / "in")
    writer = ShardWriter(tmp_path / "out", "hf", "10KB")
    for i in range(2):
        block = source.materialize(f"model.layers.{i}")
        state = {f"model.layers.{i}.{k}": v for k, v in block.state_dict().items()}
        tensors = hf_checkpoint_tensors(source.model, state)
        assert f"model.layers.{i}.mlp.experts.3.up_proj.weight" in tensors  # per expert again, as on disk
        writer.add(tensors)
        source.release(f"model.layers.{i}")
    source.materialize_outside("model.layers")
    writer.add(hf_checkpoint_tensors(source.model, {k: v for k, v in source.model.state_dict().items()
                                                    if not k.startswith("model.layers.")}))
    writer.finish()
    source.config.save_pretrained(tmp_path / "out")
    assert_same_logits(tmp_path / "out", tmp_path / "in")


def test_atlas_layout_float16(tmp_path):
    model = tiny_llama(3, hidden=64, vocab=128, tie_word_embeddings=True)
    # One shard: the single file, every state_dict tensor in float16 (tied lm_head included).
    assert write(tmp_path / "one", "atlas", "1GB", model.state_dict()) == ["quant_model_weights.safetensors"]
    _, back = read_back(tmp_path / "one", "atlas")
    expected = {name: t.half() for name, t in model.state_dict().items()}
    assert back.keys() == expected.keys() and all(torch.equal(back[k], v) for k, v in expected.items())

    files = write(tmp_path / "many", "atlas", "40KB", model.state_dict())
    assert files[0] == f"quant_model_weights-00001-of-{len(files):05d}.safetensors" and len(files) > 1
    _, back = read_back(tmp_path / "many", "atlas")
    assert all(torch.equal(back[k], v) for k, v in expected.items())

    with pytest.raises(ValueError, match="'big'.*float16"):
        ShardWriter(tmp_path / "overflow", "atlas", "1GB").add({"big": torch.tensor([1e6])})


def test_reopen_after_a_killed_run_gives_the_same_files(tmp_path):
    blocks = [floats(*[3] * 5) for _ in range(6)]  # 6 "blocks" of 5 tensors of 12 bytes; 4 tensors per shard
    blocks = [{f"b{i}.{k}": v for k, v in block.items()} for i, block in enumerate(blocks)]
    reference = write(tmp_path / "ref", "atlas", 50, *blocks)

    folder = tmp_path / "run"
    ShardWriter(folder, "atlas", 50)
    writer = ShardWriter.reopen(folder, "atlas", 50)  # killed before its first piece: nothing written yet
    assert writer.written() == []
    for block in blocks[:4]:
        writer.add(block)
    written = writer.written()
    assert written == [name for block in blocks[:4] for name in block]  # every add is on disk at once
    (folder / ".pieces" / "piece-00005.safetensors.partial").write_bytes(b"half a piece")
    del writer

    with pytest.raises(FileExistsError, match="reopen"):
        ShardWriter(folder, "atlas", 50)
    with pytest.raises(ValueError, match="same format"):
        ShardWriter.reopen(folder, "hf", 50)
    writer = ShardWriter.reopen(folder, "atlas", "50B")
    assert writer.written() == written
    assert not (folder / ".pieces" / "piece-00005.safetensors.partial").exists()
    with pytest.raises(ValueError, match="already added"):
        writer.add({sorted(written)[0]: torch.zeros(1)})
    for block in blocks:
        writer.add({k: v for k, v in block.items() if k not in written})
    assert writer.finish() == reference
    for name in reference:
        assert (folder / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    index = "quant_model_weights.safetensors.index.json"
    assert (folder / index).read_text() == (tmp_path / "ref" / index).read_text()
    assert not (folder / ".pieces").exists()


def test_reopen_after_a_killed_finish(tmp_path, monkeypatch):
    tensors = floats(*[3] * 10)
    reference = write(tmp_path / "ref", "hf", 50, tensors)
    writer = ShardWriter(tmp_path / "run", "hf", 50)
    writer.add(tensors)
    calls = []

    def killed_after_two(path, entries, real=shards._assemble):
        if len(calls) == 2:
            (path.with_name(path.stem + ".partial.safetensors")).write_bytes(b"half")
            raise KeyboardInterrupt
        calls.append(path)
        real(path, entries)

    monkeypatch.setattr(shards, "_assemble", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        writer.finish()
    monkeypatch.undo()
    assert ShardWriter.reopen(tmp_path / "run", "hf", 50).finish() == reference
    assert read_back(tmp_path / "run", "hf")[0] == read_back(tmp_path / "ref", "hf")[0]
    for name in reference:
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_memory_holds_one_add_at_a_time(tmp_path):
    writer = ShardWriter(tmp_path, "hf", "1GB")
    writer.add({"a": torch.ones(1000)})
    assert writer.written() == ["a"] and (tmp_path / ".pieces" / "piece-00001.safetensors").is_file()
