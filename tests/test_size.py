"""admm_sparse.size: the block layout's bit-exact round trip, the figures against independent counts, folders of
every kind (Atlas and Hugging Face, sharded or not, dense or pruned), the `size` command and the prune report."""
import collections
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from admm_sparse import size
from admm_sparse.cli import main
from admm_sparse.config import FloatSparseConfig
from admm_sparse.export import export_model
from admm_sparse.pipeline import prune_model
from test_export import tiny_model, tiny_tokenizer

SPECIALS = [0x0000, 0x8000, 0x0001, 0x03FF, 0x8001, 0x0400, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7C01]


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def random_float16(shape, zero_fraction, seed, specials=True) -> torch.Tensor:
    """Random float16 bit patterns (every pattern possible), a zero_fraction of them 0x0000."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint32).astype(np.uint16)
    if specials and bits.size:
        bits.flat[rng.integers(0, bits.size, size=min(bits.size, len(SPECIALS)))] = SPECIALS[: min(bits.size,
                                                                                                    len(SPECIALS))]
    bits[rng.random(shape) < zero_fraction] = 0
    return torch.from_numpy(bits.view(np.int16)).view(torch.float16)


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(0, 40), min_size=1, max_size=3), zero_fraction=st.floats(0, 1),
       seed=st.integers(0, 2**31), codec=st.sampled_from(size.CODECS),
       block_weights=st.sampled_from([8, 24, 64, 1024, size.BLOCK_WEIGHTS]))
def test_round_trip_is_bit_exact_for_random_tensors(shape, zero_fraction, seed, codec, block_weights):
    t = random_float16(shape, zero_fraction, seed)
    encoded = size.encode(t, codec, block_weights)
    back = size.decode(encoded)
    assert back.dtype == torch.float16 and back.shape == t.shape
    assert torch.equal(bits_of(back), bits_of(t))
    assert len(encoded.blocks) == math.ceil(t.numel() / block_weights)
    assert size.compressed_bytes(t, codec, block_weights) == encoded.nbytes
    assert size.measure_tensor(t, codec, block_weights).compressed_bytes == encoded.nbytes


def test_special_values_round_trip_and_minus_zero_is_a_value():
    t = torch.tensor(SPECIALS, dtype=torch.int32).to(torch.int16).view(torch.float16)
    assert torch.isnan(t).any() and torch.isinf(t).any() and (t == 0).sum() == 2
    for codec in size.CODECS:
        assert torch.equal(bits_of(size.decode(size.encode(t, codec, 8))), bits_of(t))
    # Only +0.0 (0x0000) is a zero of the pattern: -0.0 must come back as -0.0, so it is stored as a value.
    assert size.measure_tensor(t).nonzeros == len(SPECIALS) - 1


def test_blocks_are_independent():
    """Each block's frames are exactly those of its slice encoded alone: a decoder needs nothing else."""
    t = random_float16((10, 100), 0.3, seed=1)
    whole = size.encode(t, block_weights=64)
    flat = t.reshape(-1)
    for b, frames in enumerate(whole.blocks):
        alone = size.encode(flat[b * 64:(b + 1) * 64], block_weights=64)
        assert alone.blocks == [frames]


def test_figures_match_independent_counts():
    t = random_float16((50, 40), 0.4, seed=2, specials=False)  # 2000 weights: one block
    s = size.measure_tensor(t)
    raw = [int(v) & 0xFFFF for v in bits_of(t).reshape(-1).tolist()]
    values = [v for v in raw if v]
    assert (s.numel, s.nonzeros, s.float16_bytes) == (2000, len(values), 4000)
    p = len(values) / len(raw)
    assert s.pattern_bits == pytest.approx(-len(raw) * (p * math.log2(p) + (1 - p) * math.log2(1 - p)))

    def entropy(symbols):
        counts = collections.Counter(symbols)
        return -sum(c * math.log2(c / len(symbols)) for c in counts.values())

    assert s.sign_exponent_bits == pytest.approx(entropy([v >> 10 for v in values]))
    assert s.sign_exponent_bits + s.mantissa_bits == pytest.approx(entropy(values))
    d = s.to_dict()
    assert d["bits_per_weight"] == pytest.approx(8 * s.compressed_bytes / 2000, abs=1e-4)
    assert d["ratio_to_float16"] == pytest.approx(s.compressed_bytes / 4000, abs=1e-4)
    assert d["bound_bits_per_weight"] == pytest.approx(8 * s.bound_bytes / 2000, abs=1e-4)


def test_pattern_entropy_is_per_block():
    """Two blocks, one all zero and one dense: each is certain, so the pattern costs nothing."""
    t = torch.cat([torch.zeros(64), torch.ones(64)]).half()
    assert size.measure_tensor(t, block_weights=64).pattern_bits == 0
    assert size.measure_tensor(t, block_weights=128).pattern_bits == pytest.approx(128)


@pytest.mark.parametrize("codec", size.CODECS)
def test_all_zero_and_fully_dense(codec):
    zeros = torch.zeros(300, 200, dtype=torch.float16)
    z = size.measure_tensor(zeros, codec)
    assert z.nonzeros == 0 and z.bound_bytes == 0 and z.compressed_bytes < zeros.numel() * 2 / 100
    assert torch.equal(bits_of(size.decode(size.encode(zeros, codec))), bits_of(zeros))

    dense = random_float16((300, 200), 0.0, seed=4, specials=False)
    dense[dense == 0] = 1.0
    d = size.measure_tensor(dense, codec)
    assert d.nonzeros == dense.numel() and d.pattern_bits == 0
    assert torch.equal(bits_of(size.decode(size.encode(dense, codec))), bits_of(dense))
    # random bit patterns do not compress: the layout costs little above float16
    assert dense.numel() * 2 <= d.compressed_bytes < dense.numel() * 2 * 1.02


def test_other_float_dtypes_are_measured_as_float16_and_bad_input_is_refused():
    w = torch.randn(64, 32)
    assert size.measure_tensor(w).to_dict() == size.measure_tensor(w.half()).to_dict()
    with pytest.raises(ValueError, match="beyond float16"):
        size.measure_tensor(torch.tensor([1e6]))
    with pytest.raises(TypeError, match="floating"):
        size.measure_tensor(torch.ones(4, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiple of 8"):
        size.encode(w, block_weights=100)
    with pytest.raises(ValueError, match="unknown codec"):
        size.encode(w, codec="gzip")


# ---------------------------------------------------------------- real exported layers and folders

@pytest.fixture(scope="module")
def pruned():
    model = tiny_model()
    ids = torch.randint(0, 300, (8, 64), generator=torch.Generator().manual_seed(0))
    rows = prune_model(model, ids, FloatSparseConfig(0.5, ["*mlp*"]), progress=False)
    return model, [r["name"] for r in rows]


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_real_exported_layers_round_trip_and_compress(pruned, tmp_path):
    model, names = pruned
    out = export_model(model, tmp_path / "atlas", names, "atlas", tiny_tokenizer())
    tensors = load_file(out / "quant_model_weights.safetensors")
    marked = {n for n, k in json.loads((out / "quant_model_description.json").read_text()).items()
              if k == "W16A16S" and n in tensors}
    for name, t in tensors.items():
        for codec in size.CODECS:
            assert torch.equal(bits_of(size.decode(size.encode(t, codec))), bits_of(t)), name
    measured = size.measure_folder(out)
    assert measured.selection.startswith("marked W16A16S") and set(measured.tensors) == set(tensors)
    chosen = [measured.tensors[n] for n in marked]
    assert measured.selected.numel == sum(tensors[n].numel() for n in marked)
    assert measured.selected.compressed_bytes == sum(s.compressed_bytes for s in chosen)
    assert measured.all.float16_bytes == sum(2 * t.numel() for t in tensors.values())
    weights = [n for n in marked if n.endswith(".weight")]
    zeros = sum(int((bits_of(tensors[n]) == 0).sum()) for n in weights)
    assert zeros / sum(tensors[n].numel() for n in weights) == pytest.approx(0.5, abs=0.01)
    for n in weights:  # pruned and keep-bit rounded: well under float16, and above the order-0 bound
        s = measured.tensors[n]
        assert s.bound_bytes < s.compressed_bytes < 0.75 * s.float16_bytes


def totals(path, *extra, capsys):
    folder = path if path.is_dir() else path.parent
    before = digest(folder)
    assert main(["size", str(path), *extra]) == 0
    assert digest(folder) == before  # never written to
    stdout = capsys.readouterr().out
    assert "selected tensors:" in stdout and "all tensors:" in stdout
    return json.loads(stdout.strip().splitlines()[-1])


def test_size_command_on_atlas_folders_sharded_or_not(pruned, tmp_path, capsys):
    model, names = pruned
    single = export_model(model, tmp_path / "one", names, "atlas")
    sharded = export_model(model, tmp_path / "shards", names, "atlas", shard_size="20KB")
    assert (sharded / "quant_model_weights.safetensors.index.json").is_file()
    a, b = totals(single, capsys=capsys), totals(sharded, capsys=capsys)
    assert a["selection"].startswith("marked W16A16S")
    assert a["selected"] == b["selected"] and a["all"] == b["all"]
    assert a["selected"]["weights"] < a["all"]["weights"]
    assert "tensors" not in a
    per_tensor = totals(single, "--per-tensor", "--codec", "brotli", capsys=capsys)
    assert a["codec_setting"] == size.CODEC_SETTINGS["zstd"] and per_tensor["codec_setting"].startswith("brotli")
    assert per_tensor["codec"] == "brotli" and len(per_tensor["tensors"]) == len(load_file(
        single / "quant_model_weights.safetensors"))


def test_size_command_on_hugging_face_folders_dense_and_sharded(tmp_path, capsys):
    model = tiny_model(tie=False)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    a, b = totals(tmp_path / "one", capsys=capsys), totals(tmp_path / "shards", capsys=capsys)
    assert a["selection"] == size.LINEAR_RULE
    assert a["selected"] == b["selected"] and a["all"] == b["all"]
    state = model.state_dict()
    linear = [n for n, t in state.items() if t.dim() == 2 and "embed" not in n and "lm_head" not in n]
    assert len(linear) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert a["selected"]["weights"] == sum(state[n].numel() for n in linear)
    assert a["all"]["weights"] == sum(t.numel() for t in state.values())
    assert a["all"]["float16_bytes"] == 2 * a["all"]["weights"]
    assert a["selected"]["nonzero_fraction"] == 1.0  # dense: what compression alone gives


def test_size_command_lists_tensors_without_a_float16_size_and_refuses_bad_paths(tmp_path, capsys):
    save_file({"a.weight": torch.randn(8, 8).half(), "steps": torch.arange(4), "big.weight": torch.full((2, 2), 1e6)},
              tmp_path / "model.safetensors")
    result = totals(tmp_path, capsys=capsys)
    assert set(result["not_measured"]) == {"steps", "big.weight"}
    assert "floating" in result["not_measured"]["steps"] and "float16" in result["not_measured"]["big.weight"]
    assert result["all"]["weights"] == result["selected"]["weights"] == 64 and result["all"]["float16_bytes"] == 128
    assert totals(tmp_path / "model.safetensors", capsys=capsys)["all"] == result["all"]  # one file works too
    with pytest.raises(ValueError, match="not in"):
        size.measure_folder(tmp_path, selected=["a.weight", "nope.weight"])
    assert main(["size", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["size", str(tmp_path / "empty")]) == 2
    assert "no safetensors" in capsys.readouterr().err
    assert main(["size", str(tmp_path), "--block-weights", "10"]) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_prune_report_and_summary_carry_the_sizes(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tiny_model().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "out"
    assert main(["prune", "--model", str(model_dir), "--calib", str(calib), "--out", str(out), "--num-samples", "8",
                 "--seq-len", "32", "--device", "cpu", "--no-progress", "--include", "*mlp*", "--eval-windows",
                 "0"]) == 0
    stdout = capsys.readouterr().out
    assert "pruned layers:" in stdout and "bits/weight" in stdout
    printed = json.loads(stdout.strip().splitlines()[-1])["size"]
    report = json.loads((out / "prune_report.json").read_text())
    assert printed == {k: report["size"][k] for k in ("codec", "selected", "all")}
    # the pruned layers' tensors: those the description marks
    assert report["size"] == {**size.measure_folder(out).to_dict(per_tensor=False),
                              "selection": "the pruned layers' weights and biases"}
    assert len(report["layers"]) == 6
    for row in report["layers"]:
        layer = size.layer_sizes(size.measure_folder(out), [row["name"]])[row["name"]].to_dict()
        assert row["size"] == layer and layer["nonzero_fraction"] < 0.8
        # the printed table's bits/w column
        line = next(line for line in stdout.splitlines() if line.startswith(row["name"] + " "))
        assert line.split()[-1] == f"{layer['bits_per_weight']:.2f}"
