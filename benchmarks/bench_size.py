"""Why admm_sparse.size's layout, block size and codec: compressed bits per weight of a folder's W16A16S tensors
(those its quant_model_description.json marks; the LINEAR_RULE's elsewhere) under other layouts, block sizes and
codecs, beside the order-0 bound.

    python benchmarks/bench_size.py OUT --every 5      # the tensors of every 5th block (layers 0, 5, 10, ...)

Layouts, each cut into independent blocks and each block's streams compressed as frames of their own:
- float16: the block's float16 bytes as stored, one frame;
- bitmap+values: the pattern bitmap followed by the non-zero float16 values, one frame;
- split (admm_sparse.size): bitmap, the values' high bytes, their low bytes: three frames.
Prints a markdown table (bits per weight, seconds to compress) and the bound.
"""
from __future__ import annotations

import argparse
import lzma
import re
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from admm_sparse import size  # noqa: E402


DEFAULT = f"{size.CODEC_SETTINGS['zstd']} (default)"


def codecs() -> dict:
    import brotli
    import zstandard

    longest_match = zstandard.ZstdCompressionParameters.from_level(19, min_match=size.ZSTD_MIN_MATCH)
    out = {DEFAULT: size._codec("zstd")[0],
           "zstd level 3, its own min_match": zstandard.ZstdCompressor(level=3).compress,
           "zstd level 19, its own min_match": zstandard.ZstdCompressor(level=19).compress,
           f"zstd level 19, min_match {size.ZSTD_MIN_MATCH}": zstandard.ZstdCompressor(compression_params=longest_match).compress,
           "brotli 5": lambda data: brotli.compress(data, quality=size.BROTLI_QUALITY),
           "zlib 6": zlib.compress,
           "lzma 6": lambda data: lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])}
    try:
        import lz4.frame
        out["lz4"] = lz4.frame.compress
    except ImportError:
        pass
    return out


def streams(bits: np.ndarray, layout: str, block_weights: int):
    """Each block's streams (bytes) in a layout."""
    if layout == "float16":
        for start in range(0, bits.size, block_weights):
            yield [bits[start:start + block_weights].tobytes()]
        return
    for bitmap, high, low in size._split(bits, block_weights):
        if layout == "split":
            yield [bitmap.tobytes(), high.tobytes(), low.tobytes()]
        else:
            values = (high.astype(np.uint16) << 8) | low
            yield [bitmap.tobytes() + values.tobytes()]


def compressed_bits(tensors: list[np.ndarray], layout: str, block_weights: int, compress) -> tuple[float, float]:
    """(bits per weight, seconds): every stream's frame plus a 4-byte length a frame."""
    start, nbytes = time.perf_counter(), 0
    for bits in tensors:
        for block in streams(bits, layout, block_weights):
            nbytes += sum(len(compress(s)) + 4 for s in block)
    return 8 * nbytes / sum(t.size for t in tensors), time.perf_counter() - start


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--every", type=int, default=5, help="measure the tensors of every Nth block (default 5)")
    args = p.parse_args(argv)

    from safetensors import safe_open

    marked = size._atlas_marked(args.folder)
    tensors = []
    for file in size.weight_files(args.folder):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                block = re.search(r"\.(\d+)\.", name)
                shape = f.get_slice(name).get_shape()
                chosen = name in marked if marked else size.is_linear_weight(name, shape)
                if chosen and len(shape) == 2 and block and int(block.group(1)) % args.every == 0:
                    tensors.append(size.float16_bits(f.get_tensor(name)).copy())
    bound = sum((size.measure_tensor(_as_tensor(t)) for t in tensors), size.TensorSize())
    weights = sum(t.size for t in tensors)
    lines = [f"{len(tensors)} tensors, {weights:,} weights, non-zero fraction {bound.nonzeros / weights:.4f}; "
             f"order-0 bound {8 * bound.bound_bytes / weights:.3f} bits/weight (pattern "
             f"{bound.pattern_bits / weights:.3f}, sign+exponent {bound.sign_exponent_bits / weights:.3f}, mantissa "
             f"{bound.mantissa_bits / weights:.3f})", "",
             "| layout | block (weights) | codec | bits/weight | seconds |", "|---|---|---|---|---|"]
    rows = [(layout, size.BLOCK_WEIGHTS, name) for layout in ("float16", "bitmap+values", "split")
            for name in codecs()]
    rows += [("split", b, DEFAULT) for b in (1024, 4096, 65536, 262144)]
    rows += [("split", b, "brotli 5") for b in (4096, 65536)]
    all_codecs = codecs()
    for layout, block_weights, name in rows:
        bits, seconds = compressed_bits(tensors, layout, block_weights, all_codecs[name])
        lines.append(f"| {layout} | {block_weights} | {name} | {bits:.3f} | {seconds:.1f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    return text


def _as_tensor(bits: np.ndarray):
    import torch

    return torch.from_numpy(bits.view(np.int16)).view(torch.float16)


if __name__ == "__main__":
    main()
