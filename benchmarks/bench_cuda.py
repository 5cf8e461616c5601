"""GPU speed of the ADMM pruner: admm_sparse.prune_linear against admm_sparse.reference on the same card.

    python benchmarks/bench_cuda.py [--repeats 5] [--tokens 4096] [--no-reference] [--no-block]
                                    [--shapes 4096x4096,...] [--device cuda]

Per layer shape (weight out x in; ratio 0.3, random weights, `tokens` random calibration tokens):
- prune_linear: the library end to end (statistics, native ADMM, keep-bit rounding), wall time;
- reference: admm_sparse.reference.prune_linear, the same steps in plain PyTorch, same GPU;
- admm op: torch.ops.admm_sparse.admm_prune alone (20 iterations, mask re-chosen in the first 15);
- GEMM floor: what no implementation of SPEC section 2 can beat on this card, 20 float32 GEMMs
  Hinv[in, in] @ RHS[in, out] plus one Cholesky inverse of an in x in matrix; the achieved fraction
  is floor / admm op.
Then the admm op for every Linear of one LLaMA-2-7B decoder block (synthetic H = X^T X), and the effect
of the opt-in allow_tf32=True on prune_linear's time and relative output error at 4096x4096.
TF32 is off (SPEC: float32) except in that last table. Times are medians of `repeats` runs after one warm-up, with
torch.cuda.synchronize() around each run.

`--device cpu --shapes 48x64 --repeats 1 --no-block` runs this script's logic on the CPU at a toy size (the
test suite does, so that the first GPU session does not find a broken script); its figures mean nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]  # weight: out x in
LLAMA2_7B_BLOCK = [  # name, out, in
    ("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
    ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008),
]
RATIO = 0.3
ITERS, PRUNE_ITERS, PERCDAMP, RHO = 20, 15, 0.1, 1.0


def synchronize(device: torch.device) -> None:
    from admm_sparse import device as devices  # imported late: main() checks for a GPU before loading the extension

    devices.synchronize(device)


def median_seconds(fn, repeats: int, device: torch.device, setup=None) -> float:
    """Median wall time of fn() over `repeats` runs after one warm-up; setup() runs untimed before each."""
    times = []
    for i in range(repeats + 1):
        args = setup() if setup else ()
        synchronize(device)
        start = time.perf_counter()
        fn(*args)
        synchronize(device)
        if i:  # the first run is the warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def empty_cache(device: torch.device) -> None:
    from admm_sparse import device as devices

    devices.empty_cache(device)


def calibration(tokens: int, d_in: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(1, tokens, d_in, device=device, generator=g)
    # Uneven channel energies, as in real activations (a few large channels).
    x *= torch.rand(d_in, device=device, generator=g) * 2 + 0.1
    return x


def synthetic_hessian(tokens: int, d_in: int, seed: int, device: torch.device) -> torch.Tensor:
    x = calibration(tokens, d_in, seed, device)[0]
    return x.T @ x


def random_weight(d_out: int, d_in: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(d_out, d_in, device=device, generator=g) * d_in**-0.5


def gemm_floor(d_out: int, d_in: int, repeats: int, device: torch.device) -> float:
    a = torch.randn(d_in, d_in, device=device)
    spd = a @ a.T / d_in + torch.eye(d_in, device=device)
    rhs = torch.randn(d_in, d_out, device=device)
    out = torch.empty(d_in, d_out, device=device)

    def run():
        torch.cholesky_inverse(torch.linalg.cholesky(spd))
        for _ in range(ITERS):
            torch.mm(spd, rhs, out=out)

    t = median_seconds(run, repeats, device)
    del a, spd, rhs, out
    return t


def admm_op_seconds(h: torch.Tensor, w: torch.Tensor, repeats: int) -> float:
    k = int(w.numel() * RATIO)
    return median_seconds(lambda: torch.ops.admm_sparse.admm_prune(h, w, k, PERCDAMP, RHO, ITERS, PRUNE_ITERS),
                          repeats, w.device)


def bench_layer(d_out: int, d_in: int, args, reference) -> dict:
    import admm_sparse

    device = args.device
    w0 = random_weight(d_out, d_in, d_out + d_in, device)
    x = calibration(args.tokens, d_in, d_in, device)
    layer = torch.nn.Linear(d_in, d_out, bias=False, device=device)
    row = {"shape": f"{d_out}x{d_in}"}

    def fresh_layer():
        layer.weight.data.copy_(w0)
        return ()

    row["prune_linear"] = median_seconds(lambda: admm_sparse.prune_linear(layer, x, RATIO), args.repeats, device,
                                         setup=fresh_layer)
    if reference is not None:
        row["reference"] = median_seconds(lambda: reference.prune_linear(w0, [x], RATIO), args.repeats, device)
    h = x[0].T @ x[0]
    row["admm_op"] = admm_op_seconds(h, w0, args.repeats)
    del h, x, layer
    empty_cache(device)
    row["floor"] = gemm_floor(d_out, d_in, args.repeats, device)
    empty_cache(device)
    return row


def tf32_effect(args) -> list[str]:
    """prune_linear at 4096x4096 with allow_tf32 False / True: time and relative output error."""
    import admm_sparse

    device = args.device
    w0 = random_weight(4096, 4096, 1, device)
    x = calibration(args.tokens, 4096, 2, device)
    layer = torch.nn.Linear(4096, 4096, bias=False, device=device)

    def fresh_layer():
        layer.weight.data.copy_(w0)
        return ()

    lines = []
    for allow in (False, True):
        reports = []

        def run():
            reports.append(admm_sparse.prune_linear(layer, x, RATIO, allow_tf32=allow))

        t = median_seconds(run, args.repeats, device, setup=fresh_layer)
        lines.append(f"| {allow} | {ms(t)} | {reports[-1].relative_error:.6f} |")
    return lines


def shape_list(text: str) -> list[tuple[int, int]]:
    """"4096x4096,4096x11008" -> [(4096, 4096), (4096, 11008)] (weight out x in)."""
    try:
        shapes = [tuple(int(n) for n in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected OUTxIN[,OUTxIN...] such as 4096x11008, got {text!r}")
    return shapes


def ms(t: float | None) -> str:
    """Milliseconds: one decimal, or two significant digits below 1 ms (a tiny layer's step is not 0.0)."""
    if t is None:
        return "-"
    return f"{t * 1e3:.1f}" if t >= 1e-3 else f"{t * 1e3:.2g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens per layer")
    parser.add_argument("--no-reference", action="store_true", help="skip the plain-PyTorch reference")
    parser.add_argument("--no-block", action="store_true", help="skip the LLaMA-2-7B block")
    parser.add_argument("--shapes", type=shape_list, default=SHAPES, help="layers as OUTxIN[,OUTxIN...]")
    parser.add_argument("--device", type=torch.device, default=torch.device("cuda"),
                        help="cpu: a smoke run of this script's logic (toy --shapes); its figures mean nothing")
    args = parser.parse_args(argv)
    on_gpu = args.device.type == "cuda"

    if on_gpu and not torch.cuda.is_available():
        print("bench_cuda.py needs a CUDA GPU, and torch.cuda.is_available() is False on this machine "
              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). Nothing to measure.",
              file=sys.stderr)
        return 2
    import admm_sparse  # noqa: F401  (loads the extension, with a rebuild hint if it fails)
    from admm_sparse import reference

    if on_gpu and not torch._C._dispatch_has_kernel_for_dispatch_key("admm_sparse::admm_prune", "CUDA"):
        print("admm_sparse was built without its CUDA kernels; rebuild with "
              "ADMM_SPARSE_CUDA=1 pip install --no-build-isolation -e .", file=sys.stderr)
        return 2

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    # Few calibration tokens for the wide layers trigger the library's "too few tokens" warning; it
    # is expected here and would only clutter the table.
    warnings.filterwarnings("ignore", message=".*calibration tokens.*")

    card = torch.cuda.get_device_name() if on_gpu else "CPU (smoke run: these figures mean nothing)"
    print(f"# admm_sparse CUDA benchmark: {card}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, TF32 off, ratio {RATIO}, {args.tokens} tokens, "
          f"{ITERS} iterations ({PRUNE_ITERS} with mask selection), median of {args.repeats} runs\n")

    print("| layer (out x in) | prune_linear ms | reference ms | speed-up | admm op ms | GEMM floor ms "
          "| floor / admm op |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for d_out, d_in in args.shapes:
        r = bench_layer(d_out, d_in, args, None if args.no_reference else reference)
        ref_t = r.get("reference")
        speedup = f"{ref_t / r['prune_linear']:.2f}x" if ref_t else "-"
        print(f"| {r['shape']} | {ms(r['prune_linear'])} | {ms(ref_t)} | {speedup} | {ms(r['admm_op'])} "
              f"| {ms(r['floor'])} | {r['floor'] / r['admm_op']:.0%} |", flush=True)

    if not args.no_block:
        print(f"\nLLaMA-2-7B decoder block, admm op per Linear (random weights, H = X^T X of {args.tokens} "
              "random tokens):\n")
        print("| layer | out x in | admm op ms | GEMM floor ms | floor / admm op |")
        print("|---|---|---:|---:|---:|")
        total = floor_total = 0.0
        hessians: dict[int, torch.Tensor] = {}
        floors: dict[tuple[int, int], float] = {}
        for i, (name, d_out, d_in) in enumerate(LLAMA2_7B_BLOCK):
            if d_in not in hessians:
                hessians.clear()
                empty_cache(args.device)
                hessians[d_in] = synthetic_hessian(args.tokens, d_in, d_in, args.device)
            w = random_weight(d_out, d_in, 100 + i, args.device)
            t = admm_op_seconds(hessians[d_in], w, args.repeats)
            del w
            if (d_out, d_in) not in floors:
                floors[(d_out, d_in)] = gemm_floor(d_out, d_in, args.repeats, args.device)
            f = floors[(d_out, d_in)]
            total += t
            floor_total += f
            print(f"| {name} | {d_out}x{d_in} | {ms(t)} | {ms(f)} | {f / t:.0%} |", flush=True)
        print(f"| **block** | | **{ms(total)}** | **{ms(floor_total)}** | **{floor_total / total:.0%}** |")
    if on_gpu:  # TF32 is a GPU's
        print("\nallow_tf32 (prune_linear, 4096x4096, keep-bit rounding on):\n")
        print("| allow_tf32 | prune_linear ms | relative output error |")
        print("|---|---:|---:|")
        print("\n".join(tf32_effect(args)))
    print(f"\nCard: {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
