"""benchmarks/bench_front.py's points and its reading of stored results (the runs themselves take hours)."""
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package

from benchmarks.bench_front import CODEC, POINTS, Point, render  # noqa: E402


def result(point, bits, ppl, codec=CODEC, **extra):
    run = dict(point=asdict(point), perplexity=ppl, prune_seconds=1.0, achieved_sparsity=0.35,
               size=dict(bits_per_weight=bits, bound_bits_per_weight=bits - 0.3, ratio_to_float16=bits / 16), **extra)
    if codec is not None:  # None: a run stored before runs recorded their codec setting
        run["codec"] = codec
    return run


def test_points_are_unique_and_make_configs():
    assert len({p.key for p in POINTS}) == len(POINTS)
    for p in POINTS:
        if p.preset != "dense":
            config = p.config()
            assert (config.target_bits_per_weight is None) == (p.budget is None)
    assert Point("best", budget=4.04).config().sequential
    assert Point("seed", 0.3, 1, round_in_admm=True).config().round_in_admm


def test_the_reading_compares_with_the_default_the_curve_and_the_budget():
    seed = {Point("seed", r): (b, p) for r, b, p in [(0.3, 4.76, 22.8), (0.4, 4.27, 26.3), (0.5, 3.74, 34.1)]}
    runs = {pt.key: result(pt, b, p) for pt, (b, p) in seed.items()}
    runs["seed-0.3-kb1"] = result(Point("seed", 0.3, 1), 4.34, 24.3)
    runs["best-0.3-kb1"] = result(Point("best", 0.3, 1), 4.37, 22.7)
    budget = Point("seed", budget=4.04)
    runs[budget.key] = result(budget, 4.05, 27.9, budget={"predicted_bits_per_weight": 4.04},
                              layer_settings={"a": [0.3, 2, 0.02], "b": [0.5, 1, 0.0]})
    text = render({"runs": runs, "env": dict(torch="x", threads=2, date="d")}, None)
    assert "is `best-0.3-kb1`: 4.370 bits per weight (8.2% fewer bytes), perplexity 22.70" in text
    assert "`seed-0.3-kb1` against the best preset with the same setting" in text
    # the best preset's front against every seed point: beaten at its size or smaller, or not
    assert "(3 of 4 without one)" in text
    assert "`seed-0.3-kb2` (4.760 bits, 22.80): `best-0.3-kb1` (4.370 bits, 22.70)" in text
    assert "`seed-0.3-kb1` (4.340 bits, 24.30): none" in text
    assert "measured 4.050 (+0.25% of the budget), perplexity 27.90" in text
    assert "at the same size 29.29" in text  # 26.3 and 34.1 interpolated log-linearly at 4.05
    assert "| seed, budget 4.04 bits | per layer | per layer | per layer | 4.050 |" in text


def test_runs_of_an_earlier_codec_setting_are_listed_apart_and_compared_with_their_rerun():
    runs = {"seed-0.3-kb2": result(Point("seed", 0.3), 4.726, 22.76, earlier_codec=dict(
                codec="zstd level 3", bits_per_weight=4.763, perplexity=22.76)),
            "seed-0.3-kb1": result(Point("seed", 0.3, 1), 3.9, 22.0, codec=None)}  # stale, and would win
    text = render({"runs": runs, "env": dict(torch="x", threads=2, date="d")}, None)
    main, earlier = text.split("Measured with an earlier codec setting")
    assert "seed-0.3-kb1" not in main  # its bits were measured with another codec: not on this front
    assert "| `seed-0.3-kb2` | 4.763 | 4.726 | 22.76 | 22.76 |" in earlier
    assert "| `seed-0.3-kb1` | 3.900 | not re-run | 22.00 | |" in earlier
