"""What the card stores: the compressed size of float16 (W16A16S) weights, one tensor or a whole folder.

The Atlas 300I Duo's serving stack compresses W16A16S weights losslessly before loading them; keep-bit rounding
(SPEC §3) exists only so that they compress better. This module measures, for each tensor:

- `float16_bytes`: the tensor as stored, 2 bytes a weight;
- `compressed_bytes`: a layout a hardware decompressor can use, compressed with a lossless codec library.
  The flattened (row-major) tensor is cut into independent blocks of `block_weights` weights (default 16384,
  32 KiB of float16); each block is three streams, each compressed as a frame of its own:
    1. the sparsity pattern: a bitmap, one bit a weight, 1 where the float16 bit pattern is not 0x0000
       (-0.0 is a value: the card's zero is +0.0, which keep-bit rounding writes);
    2. the high bytes of the non-zero values (sign, 5 exponent bits, the 2 leading mantissa bits: with
       keep_bits=2 all that a rounded weight has);
    3. their low bytes (the other 8 mantissa bits: zero for the ~98% of weights that keep-bit rounding rounds).
  plus a 12-byte header a block (the three frames' lengths). `decode` inverts it bit for bit.
- `bound_bytes`: the information bound under an order-0 model: the pattern's entropy (each block's binary
  entropy of its non-zero fraction) plus the empirical entropy of the non-zero values as 16-bit symbols over
  the tensor, split into its sign+exponent part (6 bits) and the mantissa given sign+exponent. No coder that
  codes each weight on its own, with those distributions, does better; a coder that uses context can, on
  weights with structure beyond their histogram (dequantised GGUF weights repeat a few levels per group).

Why this layout, block size and codec: measured by benchmarks/bench_size.py on two exports of the built-in model
(SmolLM2-135M, 30% sparsity, seed mode; every 5th block's 42 tensors; benchmarks/RESULTS.md, "Compressed size"),
the default keep-bit rounding (order-0 bound 4.41 bits per weight) and rounding by salience at level 1 (bound 3.64),
in bits per weight, default first, salience second:
- layout, blocks of 16384, zstd: float16 bytes 6.01 / 5.16, bitmap + float16 values in one frame 6.26 / 5.18, the
  split into bitmap / high bytes / low bytes 4.74 / 3.82. The split is what exposes the rounding: the high byte holds
  all a rounded weight has, the low-byte stream is nearly all zeros.
- block size (split, zstd): 1024 / 4096 / 16384 / 65536 / 262144 weights gave 5.57 / 4.99 / 4.74 / 4.66 / 4.64 and
  4.53 / 4.04 / 3.82 / 3.75 / 3.73. 16384 (a 32 KiB float16 block) is within 3% of the best, with a sixteenth of
  its block buffer.
- codec (split, 16384): zstd level 3 with min_match 7 4.74 / 3.82 in 0.2 s, zstd level 3 with its own minimum match
  (4 here) 4.78 / 4.03, brotli quality 5 4.68 / 4.02 in 0.7-0.9 s, zstd level 19 with min_match 7 4.66 / 3.81 in
  5-10 s, lzma 4.76 / 3.97, zlib 5.00 / 4.24. zstd level 3 with the longest minimum match is the default: within
  2% of the smallest on both, and the fastest measured. Its own minimum match costs 5% on the salience-rounded
  export, whose high bytes are near random: short matches there cost more than the literals they replace. brotli
  (`codec="brotli"`) is 1.4% smaller on the default rounding, 5% larger on the salience one.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

BLOCK_WEIGHTS = 16384
CODECS = ("zstd", "brotli")
DEFAULT_CODEC = "zstd"
ZSTD_LEVEL = 3
# The longest match zstd allows. Weight bytes hold no repeats worth a match: with level 3's own minimum (4 on a
# block of this size) it spends bits coding coincidental short matches in the near-random value bytes, which cost
# more than the literals they replace (module docstring: 5% of the bytes of a salience-rounded export).
ZSTD_MIN_MATCH = 7
BROTLI_QUALITY = 5
# What each codec name stands for, as recorded beside every size figure that depends on it.
CODEC_SETTINGS = {"zstd": f"zstd level {ZSTD_LEVEL}, min_match {ZSTD_MIN_MATCH}",
                  "brotli": f"brotli quality {BROTLI_QUALITY}"}
BLOCK_HEADER_BYTES = 12  # three uint32 frame lengths
# The rule for "Linear weights" in a folder that does not mark them (a Hugging Face folder, a dense Atlas one):
# 2-D tensors named *.weight whose name has none of these parts (embeddings, the output head, norms).
NOT_LINEAR = ("embed", "lm_head", "norm", "wte", "wpe")
LINEAR_RULE = "2-D tensors named *.weight, except names containing " + ", ".join(NOT_LINEAR)


def _codec(name: str):
    """(compress, decompress) of a codec by name; its library is imported only when used."""
    if name == "zstd":
        try:
            import zstandard
        except ImportError as exc:
            raise ImportError("measuring compressed sizes needs the zstandard package: pip install zstandard") from exc
        params = zstandard.ZstdCompressionParameters.from_level(ZSTD_LEVEL, min_match=ZSTD_MIN_MATCH)
        compressor, decompressor = zstandard.ZstdCompressor(compression_params=params), zstandard.ZstdDecompressor()
        return compressor.compress, decompressor.decompress
    if name == "brotli":
        try:
            import brotli
        except ImportError as exc:
            raise ImportError("codec 'brotli' needs the brotli package: pip install brotli") from exc
        return (lambda data: brotli.compress(data, quality=BROTLI_QUALITY)), brotli.decompress
    raise ValueError(f"unknown codec {name!r}; use one of {', '.join(CODECS)}")


def _check_block_weights(block_weights: int) -> None:
    if not isinstance(block_weights, int) or block_weights < 8 or block_weights % 8:
        raise ValueError(f"block_weights must be a positive multiple of 8 (a block's bitmap is whole bytes), "
                         f"got {block_weights!r}")


def float16_bits(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's float16 bit patterns, flattened, as uint16. A float16 tensor is read as it is; any other
    floating dtype is converted to float16, as the Atlas export stores it (a finite value beyond float16's range
    is an error, as there)."""
    if not tensor.is_floating_point():
        raise TypeError(f"only floating tensors have a float16 size; got dtype {tensor.dtype}")
    half = tensor.detach().to("cpu", torch.float16).contiguous()
    if tensor.dtype != torch.float16 and bool((torch.isinf(half) & torch.isfinite(tensor.detach().cpu())).any()):
        raise ValueError("the tensor has values beyond float16's range (|x| > 65504); it cannot be stored as float16")
    return half.reshape(-1).view(torch.int16).numpy().view(np.uint16)


def _split(bits: np.ndarray, block_weights: int):
    """Per block: (bitmap bytes, high bytes, low bytes) of the non-zero values, as numpy arrays."""
    nonzero = bits != 0
    values = bits[nonzero]
    high, low = (values >> 8).astype(np.uint8), (values & 0xFF).astype(np.uint8)
    blocks = -(-bits.size // block_weights)
    padded = np.zeros((blocks, block_weights), dtype=bool)  # the last block padded with zeros
    padded.reshape(-1)[: bits.size] = nonzero
    bitmaps = np.packbits(padded, axis=1)
    counts = padded.sum(axis=1)
    ends = np.cumsum(counts)
    starts = ends - counts
    for b in range(blocks):
        weights = min(block_weights, bits.size - b * block_weights)
        s, e = starts[b], ends[b]
        yield bitmaps[b, : -(-weights // 8)], high[s:e], low[s:e]


@dataclass
class Encoded:
    """A tensor in the block layout: its shape, the codec and block size, and each block's three frames."""
    shape: tuple
    codec: str
    block_weights: int
    blocks: list = field(default_factory=list)  # [(bitmap frame, high-byte frame, low-byte frame)]

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed tensor: every frame plus each block's header."""
        return sum(len(f) for block in self.blocks for f in block) + BLOCK_HEADER_BYTES * len(self.blocks)


def encode(tensor: torch.Tensor, codec: str = DEFAULT_CODEC, block_weights: int = BLOCK_WEIGHTS) -> Encoded:
    """The tensor (float16, or converted to it) in the block layout of the module docstring."""
    return _encode_bits(float16_bits(tensor), tuple(tensor.shape), codec, block_weights)


def _encode_bits(bits: np.ndarray, shape: tuple, codec: str, block_weights: int) -> Encoded:
    _check_block_weights(block_weights)
    compress, _ = _codec(codec)
    blocks = [tuple(compress(part.tobytes()) for part in parts) for parts in _split(bits, block_weights)]
    return Encoded(shape, codec, block_weights, blocks)


def decode(encoded: Encoded) -> torch.Tensor:
    """The float16 tensor of an Encoded, bit for bit."""
    _, decompress = _codec(encoded.codec)
    numel = math.prod(encoded.shape)
    if len(encoded.blocks) != -(-numel // encoded.block_weights):
        raise ValueError(f"{len(encoded.blocks)} blocks do not make a tensor of shape {encoded.shape}")
    bits = np.zeros(numel, dtype=np.uint16)
    for b, (bitmap, high, low) in enumerate(encoded.blocks):
        start = b * encoded.block_weights
        weights = min(encoded.block_weights, numel - start)
        nonzero = np.unpackbits(np.frombuffer(decompress(bitmap), dtype=np.uint8), count=weights).astype(bool)
        high = np.frombuffer(decompress(high), dtype=np.uint8).astype(np.uint16)
        low = np.frombuffer(decompress(low), dtype=np.uint8).astype(np.uint16)
        if not high.size == low.size == int(nonzero.sum()):
            raise ValueError(f"block {b} is corrupt: its bitmap has {int(nonzero.sum())} non-zeros but its value "
                             f"streams hold {high.size} and {low.size}")
        bits[start: start + weights][nonzero] = (high << 8) | low
    return torch.from_numpy(bits.view(np.int16).copy()).view(torch.float16).reshape(encoded.shape)


def compressed_bytes(tensor: torch.Tensor, codec: str = DEFAULT_CODEC, block_weights: int = BLOCK_WEIGHTS) -> int:
    """Bytes of the tensor in the compressed block layout (the figure a size budget needs, without the bound)."""
    return encode(tensor, codec, block_weights).nbytes


def _entropy_bits(counts: np.ndarray) -> float:
    """Total bits of the symbols counted in `counts` under their empirical (order-0) distribution."""
    counts = counts[counts > 0].astype(np.float64)
    if counts.size == 0:
        return 0.0
    return float(-(counts * np.log2(counts / counts.sum())).sum())


def _binary_entropy_bits(ones: np.ndarray, n: np.ndarray) -> float:
    """Sum over blocks of n * h(ones / n): the bits of each block's pattern under its own non-zero fraction."""
    p = ones / n
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return float((np.nan_to_num(h) * n).sum())


@dataclass
class TensorSize:
    """One tensor's (or a sum of tensors') size figures; see the module docstring. Bits are totals."""
    numel: int = 0
    nonzeros: int = 0
    float16_bytes: int = 0
    compressed_bytes: int = 0
    pattern_bits: float = 0.0
    sign_exponent_bits: float = 0.0
    mantissa_bits: float = 0.0

    @property
    def bound_bytes(self) -> float:
        return (self.pattern_bits + self.sign_exponent_bits + self.mantissa_bits) / 8

    def __add__(self, other: TensorSize) -> TensorSize:
        return TensorSize(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def to_dict(self) -> dict:
        per_weight = (lambda nbytes: round(8 * nbytes / self.numel, 4)) if self.numel else (lambda nbytes: None)
        return {
            "weights": self.numel,
            "nonzero_fraction": round(self.nonzeros / self.numel, 6) if self.numel else None,
            "float16_bytes": self.float16_bytes,
            "compressed_bytes": self.compressed_bytes,
            "bits_per_weight": per_weight(self.compressed_bytes),
            "ratio_to_float16": round(self.compressed_bytes / self.float16_bytes, 4) if self.float16_bytes else None,
            "bound_bytes": round(self.bound_bytes),
            "bound_bits_per_weight": per_weight(self.bound_bytes),
            "bound_bits": {"pattern": round(self.pattern_bits), "sign_exponent": round(self.sign_exponent_bits),
                           "mantissa": round(self.mantissa_bits)},
        }


def measure_tensor(tensor: torch.Tensor, codec: str = DEFAULT_CODEC, block_weights: int = BLOCK_WEIGHTS) -> TensorSize:
    """The size figures of one floating tensor as float16."""
    _check_block_weights(block_weights)
    bits = float16_bits(tensor)
    nonzero = bits != 0
    values = bits[nonzero]
    blocks = -(-bits.size // block_weights) if bits.size else 0
    per_block = np.add.reduceat(nonzero, np.arange(0, bits.size, block_weights)) if bits.size else np.zeros(0)
    lengths = np.minimum(block_weights, bits.size - np.arange(blocks) * block_weights)
    value_bits = _entropy_bits(np.bincount(values, minlength=1 << 16))
    sign_exponent_bits = _entropy_bits(np.bincount(values >> 10, minlength=1 << 6))
    return TensorSize(
        numel=int(bits.size), nonzeros=int(values.size), float16_bytes=2 * int(bits.size),
        compressed_bytes=_encode_bits(bits, tuple(tensor.shape), codec, block_weights).nbytes,
        pattern_bits=_binary_entropy_bits(per_block.astype(np.float64), lengths.astype(np.float64)),
        sign_exponent_bits=sign_exponent_bits, mantissa_bits=value_bits - sign_exponent_bits)


# ---------------------------------------------------------------- folders

ATLAS_DESCRIPTION = "quant_model_description.json"


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors weight files of a folder (from its index when it has one; else every *.safetensors file
    in it), or the file itself."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a safetensors file; give a model folder or a .safetensors file")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    for index in sorted(path.glob("*.safetensors.index.json")):
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no safetensors weights; only safetensors folders can be measured "
                                "(re-save the model with save_pretrained(..., safe_serialization=True))")
    return files


def is_linear_weight(name: str, shape) -> bool:
    """The LINEAR_RULE: what counts as a Linear layer's weight in a folder that does not mark them."""
    lowered = name.lower()
    return len(shape) == 2 and name.endswith(".weight") and not any(part in lowered for part in NOT_LINEAR)


def _atlas_marked(folder: Path) -> set[str]:
    description = folder / ATLAS_DESCRIPTION
    if not description.is_file():
        return set()
    entries = json.loads(description.read_text(encoding="utf-8"))
    return {name for name, kind in entries.items() if kind == "W16A16S" and name != "model_quant_type"}


@dataclass
class FolderSize:
    """A folder's size figures: each floating tensor's, the totals of the selected tensors and of all."""
    codec: str
    block_weights: int
    selection: str  # how the selected tensors were chosen
    tensors: dict = field(default_factory=dict)  # name -> TensorSize
    selected: TensorSize = field(default_factory=TensorSize)
    all: TensorSize = field(default_factory=TensorSize)
    not_measured: dict = field(default_factory=dict)  # name -> why (not floating, beyond float16): in no total

    def to_dict(self, per_tensor: bool = True) -> dict:
        out = {"codec": self.codec, "codec_setting": CODEC_SETTINGS[self.codec], "block_weights": self.block_weights,
               "selection": self.selection,
               "selected": self.selected.to_dict(), "all": self.all.to_dict(), "not_measured": self.not_measured}
        if per_tensor:
            out["tensors"] = {name: size.to_dict() for name, size in self.tensors.items()}
        return out


def measure_folder(path: str | Path, codec: str = DEFAULT_CODEC, block_weights: int = BLOCK_WEIGHTS,
                   selected=None, selection: str = "given") -> FolderSize:
    """Size figures of a model folder (Atlas or Hugging Face, sharded or not) or of one safetensors file, read
    one tensor at a time from memory-mapped files.

    selected: names of the tensors to total as "selected" (`selection` says what they are); by default the
    tensors that an Atlas description marks W16A16S, or, where none is marked, those of the LINEAR_RULE.
    A tensor that has no float16 size (not floating, or values beyond float16's range) is left out of every
    total and listed in not_measured with the reason.
    """
    from safetensors import safe_open

    _check_block_weights(block_weights)
    _codec(codec)  # a missing library or a bad name fails before the work
    path = Path(path)
    files = weight_files(path)
    if selected is not None:
        selected = set(selected)
    else:  # None from here on: the rule decides
        selected = (_atlas_marked(path) if path.is_dir() else set()) or None
        selection = LINEAR_RULE if selected is None else f"marked W16A16S in {ATLAS_DESCRIPTION}"
    result = FolderSize(codec, block_weights, selection)
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                try:
                    size = measure_tensor(tensor, codec, block_weights)
                except (TypeError, ValueError) as exc:  # not floating, or beyond float16's range
                    result.not_measured[name] = str(exc)
                    continue
                result.tensors[name] = size
                result.all += size
                if (name in selected) if selected is not None else is_linear_weight(name, tensor.shape):
                    result.selected += size
    missing = sorted(set(selected or ()) - set(result.tensors) - set(result.not_measured))
    if missing:
        raise ValueError(f"selected tensor(s) {missing[:5]} are not in {path}")
    return result


def layer_sizes(measured: FolderSize, layers) -> dict[str, TensorSize]:
    """Per pruned layer (a name as the prune report gives it): its weight's and bias's figures together, for the
    layers whose checkpoint tensors carry the layer's own name (`<layer>.weight`, `<layer>.bias`)."""
    out = {}
    for layer in layers:
        parts = [measured.tensors[name] for name in (f"{layer}.weight", f"{layer}.bias") if name in measured.tensors]
        if parts:
            out[layer] = sum(parts, TensorSize())
    return out


# ---------------------------------------------------------------- reading the figures

def _mb(nbytes) -> str:
    return f"{nbytes / 1e6:.2f} MB"


def summary_line(figures: dict, what: str) -> str:
    """One line: float16 bytes -> compressed bytes, bits per weight, ratio, and the bound."""
    if not figures["weights"]:
        return f"{what}: no tensor"
    return (f"{what}: {figures['weights']:,} weights, float16 {_mb(figures['float16_bytes'])} -> compressed "
            f"{_mb(figures['compressed_bytes'])} ({figures['bits_per_weight']:.3f} bits/weight, "
            f"{figures['ratio_to_float16']:.3f} of float16); bound {_mb(figures['bound_bytes'])} "
            f"({figures['bound_bits_per_weight']:.3f} bits/weight)")


def format_size_table(sizes: dict) -> str:
    """A fixed-width table of {name: figures}: float16 bytes, compressed bytes, bits per weight, ratio, bound."""
    width = max([len("tensor")] + [len(name) for name in sizes])
    header = (f"{'tensor':<{width}} {'nonzero':>7} {'float16 B':>11} {'compressed B':>12} {'bits/w':>6} "
              f"{'ratio':>6} {'bound b/w':>9}")
    lines = [header, "-" * len(header)]
    for name, s in sizes.items():
        if not s["weights"]:
            continue
        lines.append(f"{name:<{width}} {s['nonzero_fraction']:7.4f} {s['float16_bytes']:>11,} "
                     f"{s['compressed_bytes']:>12,} {s['bits_per_weight']:6.3f} {s['ratio_to_float16']:6.3f} "
                     f"{s['bound_bits_per_weight']:9.3f}")
    return "\n".join(lines)
