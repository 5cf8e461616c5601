"""The `admm-sparse` command line: prune a model and export it, or measure a model's perplexity.

    admm-sparse prune --model PATH --config float_sparse.yaml --calib text.jsonl --out OUT/
    admm-sparse eval --model DIR --text FILE
    admm-sparse size PATH

Without --model / --calib it uses the built-in SmolLM2-135M-Instruct and Wikipedia text (admm_sparse.builtin).
All the work is done by library functions; this file only wires arguments to them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from . import builtin, evaluate
from . import device as devices
from .calib import HELDOUT_FRACTION, calibration_windows, read_texts, split_heldout, tokenize
from .config import OPTIONS, PRESETS, FloatSparseConfig, load_config, preset_options
from .deploy import CHECK_WINDOWS, DtypeCheck, check_dtype, describe
from .distributed import DEFAULT_TIMEOUT_S, from_environment, launched
from .evaluate import perplexity
from .export import DEFAULT_SHARD_SIZE, FORMATS, REPORT_FILE, check_output
from .export.shards import parse_size
from .job import prune_to_folder, streamable
from .layer import parse_mask_structure
from .pipeline import PruneResult
from .plan import candidate_modules, make_plan
from .report import format_table, summarize
from .size import BLOCK_WEIGHTS, CODECS, DEFAULT_CODEC, format_size_table, measure_folder, summary_line
from .source import LazySource
from .targets import find_targets

# Windows of --seq-len tokens. A user's model gets the BENCHMARKS.md protocol's 64 calibration and 100
# evaluation windows; the built-in demo gets fewer so that it runs in a few minutes on a 2-core CPU
# (16 x 512 = 8192 calibration tokens: 4x the original tool's minimum, more than any layer's 1536 inputs).
SAMPLES = {"model": 64, "builtin": 16}
EVAL_WINDOWS = {"model": 100, "builtin": 20}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="admm-sparse", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", type=Path, help="Hugging Face folder, .gguf file (or a folder holding one), or "
                        "Atlas export folder (default: the built-in SmolLM2-135M-Instruct)")
    common.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="dtype to load the model in (prune's default: the model's own, float32 for GGUF; "
                        "eval's: float32, whatever the stored dtype)")
    common.add_argument("--device", default="auto", help="compute device: cpu, cuda, cuda:1, npu, npu:1 (Ascend, with "
                        "torch_npu), xpu, mps, ... (default: the first of CUDA, NPU, XPU that is present, else the CPU). "
                        "Blocks move there one at a time; the model stays in CPU memory")
    common.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    common.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_argument("--blocks", help="full name of the decoder's stack of blocks, e.g. model.language_model.layers "
                        "(default: found in the model; --dry-run shows which)")

    p = sub.add_parser("prune", parents=[common], help="prune a model's Linear layers and export it")
    p.add_argument("--config", type=Path, help="float_sparse YAML (default: sparse_ratio 0.3, include *, exclude none)")
    p.add_argument("--preset", choices=list(PRESETS), help="a named bundle of options over the config: "
                   + "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in opts.items())
                               for name, opts in PRESETS.items()) + " (flags given override it)")
    for option in OPTIONS:  # the processor's options; each one given overrides the config's
        flag, help_text = "--" + option.name.replace("_", "-"), f"{option.doc}; overrides the config's"
        if option.parse is None:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif option.parse == "list":
            p.add_argument(flag, nargs="+", metavar="PATTERN", default=argparse.SUPPRESS, help=help_text)
        else:
            p.add_argument(flag, type=option.parse, default=argparse.SUPPRESS, help=help_text,
                           metavar=option.name.split("_")[-1].upper())
    p.add_argument("--calib", type=Path, help="calibration text: a text file or JSONL with a \"text\" field "
                   "(default: the built-in Wikipedia calibration articles)")
    p.add_argument("--num-samples", type=int, help=f"calibration windows of --seq-len tokens (default "
                   f"{SAMPLES['model']}; {SAMPLES['builtin']} for the built-in model)")
    p.add_argument("--batch-size", type=int, default=1, help="calibration windows per forward pass (default 1)")
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default ./out)")
    p.add_argument("--format", default="atlas", choices=FORMATS,
                   help="atlas: W16A16S for the Atlas 300I Duo (default); hf: a Hugging Face folder")
    p.add_argument("--force", action="store_true", help="replace an existing output folder (and start over a run "
                   "that was interrupted while writing it)")
    p.add_argument("--resume", action="store_true", help="continue the run that was interrupted while writing --out, "
                   "from its last finished block (same model, config and calibration data)")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="under torchrun: seconds a collective "
                   f"may wait for the other processes before the run fails (default {DEFAULT_TIMEOUT_S})")
    p.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, help=f"largest weight file of the output, e.g. 500MB, "
                   f"2GB, 2GiB (default {DEFAULT_SHARD_SIZE}); a larger model is written as numbered shards and an index")
    p.add_argument("--dry-run", action="store_true", help="list the layers that would be pruned, then exit")
    p.add_argument("--eval-text", type=Path, help="measure perplexity before and after on this text (default: "
                   f"the last {HELDOUT_FRACTION * 100:g}%% of --calib, held out from calibration; without --calib, "
                   "the held-out Wikipedia articles)")
    p.add_argument("--eval-windows", type=int, help=f"evaluation windows of --seq-len tokens (default "
                   f"{EVAL_WINDOWS['model']}; {EVAL_WINDOWS['builtin']} for the built-in model; 0 skips evaluation)")

    e = sub.add_parser("eval", parents=[common], help="perplexity on non-overlapping windows of a text")
    e.add_argument("--text", type=Path, help="text or JSONL file (default: the held-out Wikipedia articles)")
    e.add_argument("--num-windows", type=int, default=EVAL_WINDOWS["model"],
                   help=f"the first N windows (default {EVAL_WINDOWS['model']}, the BENCHMARKS.md protocol; 0 = all)")

    z = sub.add_parser("size", help="compressed size of a model's float16 weights: an Atlas or Hugging Face folder "
                       "(safetensors, sharded or not), ours or anyone's, or one .safetensors file")
    z.add_argument("path", type=Path, help="model folder or .safetensors file (never written to)")
    z.add_argument("--codec", choices=CODECS, default=DEFAULT_CODEC, help=f"lossless codec (default {DEFAULT_CODEC})")
    z.add_argument("--block-weights", type=int, default=BLOCK_WEIGHTS, help="weights per independently compressed "
                   f"block, a multiple of 8 (default {BLOCK_WEIGHTS})")
    z.add_argument("--per-tensor", action="store_true", help="print every tensor's figures, and put them in the JSON")
    return parser


def _device(name: str) -> torch.device:
    return devices.resolve(name)


def _model_name(path: Path | None) -> str:
    return str(path) if path is not None else f"builtin:{builtin.GGUF_FILE}"


def _text_stream(path: Path | None, tokenizer, builtin_part: str = "heldout") -> torch.Tensor:
    """Token stream of a text file, or of that part of the built-in Wikipedia articles."""
    if path is None:
        return builtin.builtin_stream(tokenizer, builtin_part)
    return tokenize("\n\n".join(read_texts(path)), tokenizer)


def _prune_texts(args, tokenizer) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
    """(calibration windows, evaluation stream or None, what that stream is) for `prune`.

    Without --eval-text, perplexity is measured on text held out from the calibration text: the built-in
    Wikipedia's held-out articles, or the end of --calib (cut off before the windows are drawn).
    """
    stream = _text_stream(args.calib, tokenizer, "calibration")
    eval_ids = eval_name = None
    if args.eval_windows > 0:
        if args.eval_text is not None:
            eval_ids, eval_name = _text_stream(args.eval_text, tokenizer), str(args.eval_text)
        elif args.calib is None or args.model is None:  # the built-in text or model: its held-out articles
            eval_ids, eval_name = _text_stream(None, tokenizer), "builtin:wikipedia-heldout"
        else:
            kept, heldout = split_heldout(stream)
            name = f"held-out last {HELDOUT_FRACTION:.0%} of {args.calib}"
            if heldout.numel() < args.seq_len:
                warnings.warn(f"the {name} has {heldout.numel()} tokens, fewer than one window of {args.seq_len}: "
                              "no perplexity is measured and all of it calibrates; give --eval-text FILE or a "
                              "longer calibration text")
            else:
                stream, eval_ids, eval_name = kept, heldout, name
    return calibration_windows(stream, args.num_samples, args.seq_len), eval_ids, eval_name


def cmd_eval(args) -> int:
    # float32 unless asked, whatever the stored dtype (an Atlas export stores float16): the model's quality
    # without float16's range limit; --dtype float16 shows that limit's effect
    model, tokenizer = builtin.load_model(args.model, "float32" if args.dtype == "auto" else args.dtype)
    dtype = next(model.parameters()).dtype
    ids = _text_stream(args.text, tokenizer)
    device = _device(args.device)
    start = time.perf_counter()
    ppl = perplexity(model, ids, args.seq_len, args.num_windows or None, device, progress=not args.no_progress)
    available = ids.numel() // args.seq_len
    windows = min(args.num_windows, available) if args.num_windows else available
    if not math.isfinite(ppl):  # find where, rather than report a NaN perplexity
        found = check_dtype(model, ids[: windows * args.seq_len].reshape(windows, args.seq_len), device, dtype)
        where = describe(found) if not found["ok"] else (
            f"every block's output is finite in {found['dtype']}, so the overflow comes after the last block "
            "(the final norm or the output layer)")
        hint = "; leave --dtype out to measure it in float32" if dtype != torch.float32 else ""
        raise ValueError(f"the model's logits are not finite in {found['dtype']} (perplexity {ppl}): {where}{hint}")
    print(json.dumps({"model": _model_name(args.model), "text": str(args.text or "builtin:wikipedia-heldout"),
                      "dtype": str(dtype).removeprefix("torch."), "windows": windows, "seq_len": args.seq_len,
                      "perplexity": round(ppl, 4), "seconds": round(time.perf_counter() - start, 1)}))
    return 0


def _check_selection(model, config, source: str, blocks: str | None) -> dict:
    """The layers to prune; none is an error here, before calibration (prune_model would just return [])."""
    the_plan = make_plan(model, config, blocks)
    if the_plan.targets:
        return the_plan.targets
    names = [t.name for t in find_targets(candidate_modules(model, the_plan.stack))]
    fits, fix = "", "the patterns"
    if parse_mask_structure(config.mask_structure)[0] == "N:M":  # make_plan drops the layers N:M does not fit
        fits, fix = f" that mask_structure {config.mask_structure!r} fits", "the patterns or the mask structure"
    raise ValueError(f"{source} selects no layer to prune: include {config.include} and exclude {config.exclude} "
                     f"match none of the model's {len(names)} prunable layers{fits} "
                     f"(named like {names[:8]}); fix {fix}")


def _dry_run(model, config, blocks) -> int:
    the_plan = make_plan(model, config, blocks)
    total = len(find_targets(model.named_modules()))
    for name, t in the_plan.targets.items():
        out_features, in_features = t.shape
        print(f"{name:<50} {out_features:>6} x {in_features:<6} {t.kind:>7} {str(t.weight.dtype):>15}")
    for name in the_plan.routers:
        print(f"{name:<50} not pruned: MoE router (pruning it would change which experts run)")
    for name, why in the_plan.tied.items():
        print(f"{name:<50} not pruned: {why}")
    for name in the_plan.unknown:
        print(f"{name:<50} not pruned: a parameter layout admm_sparse does not know")
    stack = the_plan.stack
    where = f"in the block stack '{stack[0]}'" if stack else "(no block stack: one pass over the whole model)"
    experts = sum(t.kind == "expert" for t in the_plan.targets.values())
    target = f"sparse_ratio {config.sparse_ratio:g}" if config.target_bits_per_weight is None else \
        f"a size budget of {config.target_bits_per_weight:g} bits per weight"
    print(f"{len(the_plan.targets)} of {total} prunable layers would be pruned to {target} "
          f"({config.mask_structure}, {config.mode} mode) {where}"
          + (f"; {experts} of them are experts' matrices" if experts else ""))
    return 0


def _open_model(args, config: FloatSparseConfig):
    """(model, tokenizer, LazySource or None): a Hugging Face safetensors folder is streamed block by block
    (its model is a skeleton), anything else is loaded into memory; with distillation, which fits the whole model
    at once, every model is loaded into memory."""
    if args.model is not None and streamable(args.model) and not config.distill_epochs:
        from transformers import AutoTokenizer

        source = LazySource(args.model, None if args.dtype == "auto" else args.dtype)
        return source.model, AutoTokenizer.from_pretrained(args.model), source
    model, tokenizer = builtin.load_model(args.model, args.dtype)
    return model, tokenizer, None


def _config(args) -> FloatSparseConfig:
    """The YAML config (or the default one), the preset's options over it, then the command line's overrides."""
    config = load_config(args.config) if args.config else FloatSparseConfig()
    flags = {o.name: getattr(args, o.name) for o in OPTIONS if hasattr(args, o.name)}
    changes = {**(preset_options(args.preset) if args.preset else {}), **flags}
    if not changes:
        return config
    if changes.get("target_bits_per_weight") is not None and "sparse_ratio" not in changes:
        changes["sparse_ratio"] = None  # a size budget chooses every layer's ratio
    if "mask_structure" in changes and "sparse_ratio" not in changes:
        if parse_mask_structure(changes["mask_structure"])[0] == "N:M":
            changes["sparse_ratio"] = None  # N:M fixes the ratio; the config's own would contradict it
    return dataclasses.replace(config, **changes)


def cmd_prune(args) -> int:
    start = time.perf_counter()
    config = _config(args)
    kind = "model" if args.model else "builtin"
    args.num_samples = SAMPLES[kind] if args.num_samples is None else args.num_samples
    args.eval_windows = EVAL_WINDOWS[kind] if args.eval_windows is None else args.eval_windows
    for flag in ("seq_len", "num_samples", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    parse_size(args.shard_size)
    protect = [args.model or builtin.builtin_model_file()]
    if not args.dry_run:
        check_output(args.out, args.force, protect)  # before the expensive part
    model, tokenizer, source = _open_model(args, config)
    _check_selection(model, config, f"the config {args.config}" if args.config else "the default config", args.blocks)
    if args.dry_run:
        return _dry_run(model, config, args.blocks)

    calib, eval_ids, eval_name = _prune_texts(args, tokenizer)
    eval_windows = None if eval_ids is None else evaluate.eval_windows(eval_ids, args.seq_len, args.eval_windows)
    group, device = from_environment(_device(args.device), args.dist_timeout)  # several processes under torchrun
    # The card computes in float16: will the pruned model overflow there? (Checked as the blocks pass.)
    check = DtypeCheck(torch.float16, calib[:CHECK_WINDOWS]) if args.format == "atlas" else None
    report = {
        "model": _model_name(args.model),
        "config": config.to_dict(),
        "calibration": {"text": str(args.calib or "builtin:wikipedia-calibration"), "windows": int(calib.shape[0]),
                        "seq_len": int(calib.shape[1])},
        "device": str(device),
        "format": args.format,
        "streamed": source is not None,
        "processes": group.size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }

    def finish_report(result: PruneResult, report: dict) -> dict:
        return {**report, "summary": summarize(result.rows),
                "perplexity": None if eval_windows is None else {
                    "text": eval_name, "seq_len": args.seq_len, "windows": int(eval_windows.shape[0]),
                    "before": result.perplexity_before, "after": result.perplexity_after},
                "float16_check": None if check is None else check.result,
                "peak_memory_bytes": result.peak_memory_bytes, "block_seconds": result.block_seconds,
                "seconds": round(time.perf_counter() - start, 1), "layers": result.rows,
                **({"reconstruction": result.reconstruction} if result.reconstruction else {}),
                **({"distillation": result.distillation} if result.distillation else {}),
                **({"budget": result.budget} if result.budget else {})}

    result = prune_to_folder(model, calib, args.out, config, fmt=args.format, tokenizer=tokenizer, source=source,
                             shard_size=args.shard_size, device=device, batch_size=args.batch_size,
                             progress=not args.no_progress, blocks=args.blocks, eval_windows=eval_windows,
                             dtype_check=check, resume=args.resume, force=args.force, protect=protect, report=report,
                             finish_report=finish_report, group=group)
    if group.rank != 0:
        return 0  # rank 0 reports
    if check is not None and not check.result["ok"]:
        command = "admm-sparse eval" + (f" --model {args.model}" if args.model else "") + " --dtype float16"
        warnings.warn(f"the pruned model overflows float16, in which the Atlas 300I Duo computes, so it will give "
                      f"inf/NaN on the card: {describe(check.result)}, on {check.result['windows']} calibration windows. "
                      f"The export is written; see whether the unpruned model does the same: {command}")
    print(format_table(result.rows))
    size = _print_size(args.out / REPORT_FILE)
    if result.budget:
        print(f"size budget: {result.budget['target_bits_per_weight']:g} bits per weight, predicted by the probe pass "
              f"{result.budget['predicted_bits_per_weight']:.3f}, measured {size['selected']['bits_per_weight']:.3f}")
    for r in result.reconstruction:
        part = f" ({r['part']})" if r.get("part") else ""
        print(f"reconstructed {r['block']}{part}: relative MSE to the dense block held out {r['heldout_before']:.4g} -> "
              f"{r['heldout_after']:.4g} "
              f"(epoch {r['best_epoch']} of {r['epochs']} kept, {r['seconds']:.1f} s)")
    if result.distillation:
        r = result.distillation
        print(f"distilled: KL to the dense model's next-token distributions held out {r['heldout_before']:.4g} -> "
              f"{r['heldout_after']:.4g} (epoch {r['best_epoch']} of {r['epochs']} kept, {r['seconds']:.1f} s)"
              + (f"; {r['sampled_batches']} batches sampled from the dense model in {r['sampling_seconds']:.1f} s"
                 if r.get("sampled_batches") else ""))
    if eval_windows is not None:
        print(f"perplexity before {result.perplexity_before:.4f}, after {result.perplexity_after:.4f} "
              f"({eval_windows.shape[0]} windows x {args.seq_len} tokens of {eval_name})")
    print(f"wrote {args.out} ({args.format}) with its report in {args.out / 'prune_report.json'}")
    summary = finish_report(result, report)
    print(json.dumps({**{k: summary[k] for k in ("model", "config", "summary", "perplexity", "float16_check",
                                                 "peak_memory_bytes", "seconds")},
                      "size": {k: size[k] for k in ("codec", "selected", "all")}}))
    return 0


def _print_size(report_file: Path) -> dict:
    """Print the compressed-size totals a prune report holds (each layer's are in the report); return its "size"."""
    size = json.loads(report_file.read_text(encoding="utf-8"))["size"]
    print(summary_line(size["selected"], "pruned layers") + f" ({size['codec']}, blocks of {size['block_weights']})")
    print(summary_line(size["all"], "all tensors"))
    return size


def cmd_size(args) -> int:
    measured = measure_folder(args.path, args.codec, args.block_weights)
    if args.per_tensor:
        print(format_size_table({name: s.to_dict() for name, s in measured.tensors.items()}))
    print(f"selected: {measured.selection}")
    print(summary_line(measured.selected.to_dict(), "selected tensors"))
    print(summary_line(measured.all.to_dict(), "all tensors"))
    print(json.dumps({"path": str(args.path), **measured.to_dict(per_tensor=args.per_tensor)}))
    return 0


def _which_process() -> str:
    """" (rank R of N)" in an error under torchrun, so that the failing process is named."""
    return f" (rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']})" if launched() else ""


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # so that a killed export cleans up its temporary folder


def main(argv: list[str] | None = None) -> int:
    if launched():  # under torchrun: a failed rank's error reaches the launcher's summary
        return record(_main)(argv)
    return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "threads", None):  # the size command has no --threads
        torch.set_num_threads(args.threads)
    old_format, old_sigterm = warnings.formatwarning, signal.signal(signal.SIGTERM, _on_sigterm)
    warnings.formatwarning = lambda msg, category, *rest: f"admm-sparse: warning: {msg}\n"
    try:
        return {"prune": cmd_prune, "eval": cmd_eval, "size": cmd_size}[args.command](args)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        print(f"admm-sparse: error{_which_process()}: {exc}", file=sys.stderr)
        return 2
    except torch.distributed.DistError as exc:  # another process failed or hung: its own error says why
        print(f"admm-sparse: error{_which_process()}: waiting for the other processes failed ({exc}); another "
              "process has failed (see its error above), or none answered within --dist-timeout", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("admm-sparse: interrupted; no output was written (a run that had finished a block can be continued "
              "with --resume)", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = old_format
        signal.signal(signal.SIGTERM, old_sigterm)
        if launched() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
