"""The per-layer prune report in the terminal: totals and a fixed-width table."""
from __future__ import annotations

import torch


def summarize(rows: list[dict]) -> dict:
    """Totals over the per-layer reports: layer count, overall zero fraction, mean relative error, seconds."""
    if not rows:
        return {"layers": 0, "sparsity": 0.0, "mean_relative_error": 0.0, "seconds": 0.0}
    sizes = [int(torch.Size(r["shape"]).numel()) if "shape" in r else 1 for r in rows]
    return {
        "layers": len(rows),
        "sparsity": sum(r["sparsity"] * s for r, s in zip(rows, sizes)) / sum(sizes),
        "mean_relative_error": sum(r["relative_error"] for r in rows) / len(rows),
        "seconds": sum(r["seconds"] for r in rows),
    }


def format_table(rows: list[dict]) -> str:
    """The per-layer report as a fixed-width text table, with a totals line. bits/w: the written weight's
    compressed bits per weight (admm_sparse.size), where the job measured it."""
    width = max([len("layer")] + [len(r["name"]) for r in rows])
    header = (f"{'layer':<{width}} {'shape':>11} {'sparsity':>8} {'rel.err':>8} {'seconds':>8} {'damping':>9} "
              f"{'bits/w':>6}")
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = "x".join(str(s) for s in r.get("shape", ()))
        damping = r.get("damping")
        damping = f"{damping:9.3g}" if isinstance(damping, (int, float)) else f"{'-':>9}"
        bits = (r.get("size") or {}).get("bits_per_weight")
        bits = f"{bits:6.2f}" if isinstance(bits, (int, float)) else f"{'-':>6}"
        lines.append(f"{r['name']:<{width}} {shape:>11} {r['sparsity']:8.4f} {r['relative_error']:8.4f} "
                     f"{r['seconds']:8.2f} {damping} {bits}")
    s = summarize(rows)
    lines.append("-" * len(header))
    lines.append(f"{s['layers']} layers, sparsity {s['sparsity']:.4f}, mean relative error "
                 f"{s['mean_relative_error']:.4f}, {s['seconds']:.1f} s pruning")
    return "\n".join(lines)
