"""Streaming from disk: peak memory against depth, and the time streaming costs.

    python benchmarks/bench_streaming.py memory --write   # 4 and 16 blocks of one synthetic architecture
    python benchmarks/bench_streaming.py time --write     # the built-in model, streamed vs in memory

memory: a LLaMA-style model with random weights (hidden 1024, intermediate 2816, vocabulary 49152 so that the
built-in SmolLM2 tokenizer serves it; float32), built from a config and saved as sharded safetensors with
4 and with 16 blocks; `admm-sparse prune` (a fresh process each) streams it block by block to an Atlas
folder. Peak resident memory is the process's own (prune_report.json's peak_memory_bytes, getrusage's
maxrss). Target: the 16-block peak at most the 4-block peak plus 10% of the 12 extra blocks' bytes.

time: the built-in model saved as a Hugging Face safetensors folder (float32), pruned through
job.prune_to_folder once streamed (LazySource) and once loaded in memory (from_pretrained), alternately in
one process, model opening included; median of the runs. Target: streaming at most 5% slower.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.results_md import RESULTS_MD, write_section  # noqa: E402

MIB = 2**20


def synthetic_model(folder: Path, blocks: int, tokenizer) -> int:
    """Save the synthetic architecture with `blocks` blocks; returns one block's bytes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816, num_hidden_layers=blocks,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, max_shard_size="200MB")
    tokenizer.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())


def memory(args) -> str:
    from admm_sparse import builtin

    _, tokenizer = builtin.load_model(None)
    calib = Path(args.tmp) / "calib.txt"
    calib.write_text(builtin.wikipedia_split()[0][:200_000])
    rows, block_bytes = {}, 0
    for blocks in (4, 16):
        folder = Path(args.tmp) / f"synthetic-{blocks}"
        block_bytes = synthetic_model(folder, blocks, tokenizer)
        out = Path(args.tmp) / f"out-{blocks}"
        command = [sys.executable, "-m", "admm_sparse", "prune", "--model", str(folder), "--calib", str(calib),
                   "--out", str(out), "--num-samples", str(args.windows), "--seq-len", "512", "--eval-windows", "0",
                   "--threads", str(args.threads), "--device", "cpu", "--no-progress", "--force"]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        report = json.loads((out / "prune_report.json").read_text())
        disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        rows[blocks] = (report["peak_memory_bytes"], disk, seconds)
    extra = 12 * block_bytes
    limit = rows[4][0] + 0.1 * extra
    lines = [f"Synthetic LLaMA-style model (hidden 1024, intermediate 2816, vocabulary {len(tokenizer)}, float32, one "
             f"block {block_bytes / MIB:.1f} MiB), saved in 200 MB safetensors shards; `admm-sparse prune` to Atlas, "
             f"{args.windows} calibration windows of 512 tokens, {args.threads} thread(s), torch {torch.__version__}.",
             "", "| blocks | model on disk MiB | peak resident memory MiB | peak / model size | wall s |",
             "|---|---|---|---|---|"]
    for blocks, (peak, disk, seconds) in rows.items():
        lines.append(f"| {blocks} | {disk / MIB:.0f} | {peak / MIB:.0f} | {peak / disk:.2f} | {seconds:.0f} |")
    growth = rows[16][0] - rows[4][0]
    lines += ["", f"16 blocks against 4: peak +{growth / MIB:.0f} MiB for 12 more blocks of {extra / MIB:.0f} MiB "
              f"({growth / extra:.1%} of their bytes; target at most 10%, i.e. a peak of at most {limit / MIB:.0f} MiB: "
              f"**{'met' if rows[16][0] <= limit else 'missed'}**)."]
    return "\n".join(lines)


def timing(args) -> str:
    from transformers import AutoModelForCausalLM

    from admm_sparse import builtin
    from admm_sparse.config import FloatSparseConfig
    from admm_sparse.job import prune_to_folder
    from admm_sparse.source import LazySource

    torch.set_num_threads(args.threads)
    data = builtin.load_builtin(num_calib=args.windows)
    folder = Path(args.tmp) / "smollm2"
    data.model.save_pretrained(folder)
    config = FloatSparseConfig(0.5)
    seconds = {"streamed": [], "in memory": []}
    for run in range(args.runs):
        for kind in seconds:
            start = time.perf_counter()
            if kind == "streamed":
                source = LazySource(folder)
                model = source.model
            else:
                source, model = None, AutoModelForCausalLM.from_pretrained(folder).eval()
            prune_to_folder(model, data.calib, Path(args.tmp) / f"out-{run}-{kind}", config, fmt="atlas",
                            source=source, progress=False)
            seconds[kind].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    ratio = med["streamed"] / med["in memory"]
    lines = [f"Built-in SmolLM2-135M saved as a Hugging Face safetensors folder (float32), ratio 0.5 to Atlas, "
             f"{args.windows} calibration windows of 512 tokens, {args.threads} thread(s), torch {torch.__version__}; "
             f"the two paths alternate, {args.runs} runs each, model opening included.", "",
             "| path | median s | runs s |", "|---|---|---|"]
    for kind, values in seconds.items():
        lines.append(f"| {kind} | {med[kind]:.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    lines += ["", f"Streaming / in memory: {ratio:.3f} (target at most 1.05: **{'met' if ratio <= 1.05 else 'missed'}**)."]
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["memory", "time"])
    p.add_argument("--windows", type=int, default=8, help="calibration windows of 512 tokens (default 8)")
    p.add_argument("--runs", type=int, default=3, help="time: runs of each path (default 3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true", help=f"replace this part's section of {RESULTS_MD.name}")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        text = memory(args) if args.part == "memory" else timing(args)
    print(text)
    if args.write:
        begin, end = f"<!-- streaming-{args.part}:begin -->", f"<!-- streaming-{args.part}:end -->"
        title = {"memory": "Streaming: peak memory against depth", "time": "Streaming: what it costs in time"}
        command = f"python benchmarks/bench_streaming.py {args.part} --write"
        write_section(RESULTS_MD, f"{begin}\n## {title[args.part]}\n\nCommand: `{command}`\n\n{text}\n{end}", begin, end)
    return text


if __name__ == "__main__":
    main()
