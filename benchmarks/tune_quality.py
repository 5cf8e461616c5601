"""Quality mode's knobs, measured on real layers: held-out relative output error of single layers of the
built-in model, pruned from the dense model's calibration inputs, for the seed mode and for quality mode
with its defaults and with one knob changed at a time. This is how quality mode's defaults were chosen.

    python benchmarks/tune_quality.py --ratio 0.7 --write   # --write: into benchmarks/RESULTS.md

Layers: the quality benchmark's four table layers and three more (attention and MLP, early and late
blocks); calibration 64 x 512 tokens (BENCHMARKS.md), error on the first 16 held-out 512-token windows.
Prints a markdown table: mean error over the layers, its ratio to the seed mode, mean ADMM iterations and
total seconds per setting. Keep-bit rounding is off (this compares the pruning alone).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.baselines import relative_output_error  # noqa: E402
from benchmarks.quality import FULL_LAYERS, _capture_inputs, _heldout_grams  # noqa: E402
from benchmarks.results_md import RESULTS_MD, write_section  # noqa: E402

BEGIN, END = "<!-- tune-quality:begin -->", "<!-- tune-quality:end -->"

LAYERS = FULL_LAYERS + ["model.layers.5.self_attn.k_proj", "model.layers.15.mlp.gate_proj",
                        "model.layers.25.self_attn.v_proj"]
# (label, fasterprune options): the seed, quality mode's defaults, then one knob changed at a time.
SETTINGS = [
    ("seed mode", dict(mode="seed")),
    ("quality, defaults", dict(mode="quality")),
    ("quality_rho=0.01", dict(mode="quality", quality_rho=0.01)),
    ("quality_rho=1.0", dict(mode="quality", quality_rho=1.0)),
    ("percdamp=0.003", dict(mode="quality", percdamp=0.003)),
    ("percdamp=0.03", dict(mode="quality", percdamp=0.03)),
    ("percdamp=0.1", dict(mode="quality", percdamp=0.1)),
    ("quality_check_every=6", dict(mode="quality", quality_check_every=6)),
    ("quality_max_iters=30", dict(mode="quality", quality_max_iters=30)),
    ("refit_iters=20", dict(mode="quality", refit_iters=20)),
]


def main(argv=None) -> str:
    from admm_sparse.builtin import load_builtin
    from admm_sparse.layer import DEFAULT_OPTIONS, AdmmPruner

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true", help="store the table in benchmarks/RESULTS.md")
    p.add_argument("--quick", action="store_true", help="smoke test: one layer, 4 x 128 tokens, two settings")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers, settings = (LAYERS[:1], SETTINGS[:2]) if args.quick else (LAYERS, SETTINGS)
    windows, seq_len, heldout_windows = (4, 128, 1) if args.quick else (64, 512, 16)

    data = load_builtin(num_calib=windows, seq_len=seq_len)
    grams = _heldout_grams(data.model, data.heldout, layers, heldout_windows, seq_len)
    inputs = _capture_inputs(data.model, data.calib, layers)
    pruners = {}
    for name in layers:
        w0 = data.model.get_submodule(name).weight.detach().clone()
        layer = nn.Linear(w0.shape[1], w0.shape[0], bias=False)
        pruner = AdmmPruner(layer, keep_bits=None)
        for x in inputs.pop(name):
            pruner.add_batch(x)
        pruners[name] = (w0, layer, pruner)

    lines = [f"ratio {args.ratio}, {len(layers)} layers, {args.threads} thread(s), torch {torch.__version__}. Each layer "
             f"pruned on its own from the dense model's inputs ({windows} x {seq_len} calibration tokens), keep-bit "
             f"rounding off; error ||(W - W') X^T|| / ||W X^T|| on the first {heldout_windows} held-out windows; "
             f"iterations: quality mode's ADMM iterations (the seed runs {DEFAULT_OPTIONS['iters']}); seconds: all layers, this setting.", "",
             "| setting | mean held-out error | x seed | mean iterations | seconds |", "|---|---|---|---|---|"]
    seed_error = None
    for label, options in settings:
        errors, iterations, start = [], [], time.perf_counter()
        for name, (w0, layer, pruner) in pruners.items():
            layer.weight.data.copy_(w0)
            report = pruner.fasterprune(args.ratio, **options)
            errors.append(relative_output_error(w0, layer.weight.detach(), grams[name]))
            iterations.append(report.iterations or DEFAULT_OPTIONS["iters"])  # the seed mode runs a fixed count
        mean = sum(errors) / len(errors)
        seed_error = seed_error or mean
        lines.append(f"| {label} | {mean:.4f} | {mean / seed_error:.3f} | {sum(iterations) / len(iterations):.0f} | "
                     f"{time.perf_counter() - start:.1f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.write:
        command = "python benchmarks/tune_quality.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
        write_section(RESULTS_MD, f"{BEGIN}\n## Quality mode's knobs on real layers\n\nCommand: `{command}`\n\n"
                      f"{text}\n{END}", BEGIN, END)
    return text


if __name__ == "__main__":
    main()
