"""The size budget (config target_bits_per_weight, admm_sparse.budget): the choice of each layer's ratio and keep
bits, the probe's measurements, the whole loop meeting the budget, and the refusals."""
import math

import pytest
import torch
from torch import nn

from admm_sparse import budget
from archs import tiny_llama
from admm_sparse.config import ConfigError, FloatSparseConfig
from admm_sparse.keepbits import round_float16
from admm_sparse.layer import AdmmPruner
from admm_sparse.pipeline import prune_blocks, prune_model
from admm_sparse.size import TensorSize, measure_tensor


def settings(rows):
    """SizeProbe-shaped rows from (ratio, keep_bits, error, bytes) tuples, keep_proportion 0.02."""
    return [[r, k, 0.02, e, b] for r, k, e, b in rows]


def test_choose_spends_the_bytes_where_they_save_the_most_error():
    shapes = {"a": (10, 10), "b": (10, 10)}
    # a: one more byte saves much error; b: bytes buy little
    measured = {"a": settings([(0.5, 2, 0.9, 50), (0.3, 2, 0.1, 80)]),
                "b": settings([(0.5, 2, 0.2, 50), (0.3, 2, 0.19, 80)])}
    chosen, total = budget.choose(shapes, measured, 8 * 130 / 200)  # 130 bytes for 200 weights
    assert chosen == {"a": (0.3, 2, 0.02), "b": (0.5, 2, 0.02)} and total == 130
    chosen, total = budget.choose(shapes, measured, 8 * 160 / 200)
    assert chosen == {"a": (0.3, 2, 0.02), "b": (0.3, 2, 0.02)} and total == 160
    with pytest.raises(ValueError, match=r"below the smallest size the settings reach \(4.000 bits"):
        budget.choose(shapes, measured, 8 * 99 / 200)


def test_choose_skips_dominated_and_non_convex_settings():
    shapes = {"a": (1, 100)}
    measured = {"a": settings([(0.7, 1, 1.0, 10), (0.6, 1, 1.2, 20),  # more bytes, more error: never worth it
                               (0.5, 2, 0.99, 30),  # above the chord from 10 to 40: the hull skips it
                               (0.3, 2, 0.1, 40)])}
    assert budget._hull([(b, 100 * e * e, r, k) for r, k, _, e, b in measured["a"]])[1][2:] == (0.3, 2)
    chosen, total = budget.choose(shapes, measured, 8 * 35 / 100)  # the 30-byte step does not exist: stay at 10
    assert chosen == {"a": (0.7, 1, 0.02)} and total == 10


def test_choose_lands_within_one_step_of_the_budget():
    g = torch.Generator().manual_seed(0)
    shapes, measured = {}, {}
    for i in range(60):
        shapes[f"l{i}"] = (64, 64)
        errors = sorted(torch.rand(len(budget.RATIOS), generator=g).tolist())  # more zeros, more error
        measured[f"l{i}"] = settings([(r, 2, e, int(1000 + 3000 * (1 - r))) for r, e in zip(budget.RATIOS, errors)])
    for target in (3.5, 5.0, 7.0):  # the settings span 3.1 to 7.8 bits per weight
        chosen, total = budget.choose(shapes, measured, target)
        want = target * 60 * 64 * 64 / 8
        assert want - 600 <= total <= want  # short of it by less than the largest step (0.2 of 3000 bytes)
        assert total == sum(dict((r, b) for r, _, _, _, b in measured[n])[chosen[n][0]] for n in chosen)


def correlated(tokens, d_in, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g) @ (torch.randn(d_in, d_in, generator=g) / d_in**0.5 + torch.eye(d_in))
    return x * torch.exp(torch.randn(d_in, generator=g) * 0.5)


def test_the_probe_measures_every_setting_and_leaves_the_weight_dense():
    torch.manual_seed(0)
    layer = nn.Linear(128, 48, bias=False)
    dense = layer.weight.detach().clone()
    probe = budget.SizeProbe(layer, mode="fast", keep_bits=None)
    probe.add_batch(correlated(512, 128, 1))
    rows = probe.fasterprune()["settings"]
    assert torch.equal(layer.weight, dense)
    grid = budget.rounding_grid()
    assert [tuple(r[:3]) for r in rows] == [(r, k, p) for r in budget.RATIOS for k, p in grid]
    assert (None, 0.0) in grid and (2, 0.02) in grid and len(grid) == 1 + 3 * len(budget.KEEP_PROPORTIONS)
    table = {tuple(r[:3]): tuple(r[3:]) for r in rows}
    assert table[(0.0, None, 0.0)][0] < 1e-3  # float16's own rounding only
    assert table[(0.0, None, 0.0)][1] == measure_tensor(dense).compressed_bytes
    for r in budget.RATIOS:  # fewer mantissa bits: fewer bytes, more error
        assert table[(r, None, 0.0)][1] > table[(r, 3, 0.02)][1] > table[(r, 2, 0.02)][1] > table[(r, 1, 0.02)][1]
        assert table[(r, 1, 0.02)][0] > table[(r, 2, 0.02)][0] > table[(r, 3, 0.02)][0]
        for kb in (1, 2, 3):  # more weights kept whole: more bytes, less error
            assert table[(r, kb, 0.0)][1] < table[(r, kb, 0.02)][1] < table[(r, kb, 0.05)][1]
            assert table[(r, kb, 0.0)][0] > table[(r, kb, 0.02)][0] > table[(r, kb, 0.05)][0]
    for k, p in grid:  # more zeros: more error
        errors = [table[(r, k, p)][0] for r in budget.RATIOS]
        assert errors == sorted(errors)


def test_the_probes_error_is_the_exact_one_within_a_tenth_of_a_percent():
    """The probe takes the rounding's own term on H's diagonal: against tr(ΔHΔᵀ) of the same weight."""
    from admm_sparse.keepbits import apply_keepbits
    from admm_sparse.layer import quadratic_trace

    torch.manual_seed(1)
    layer, twin = nn.Linear(256, 64, bias=False), nn.Linear(256, 64, bias=False)
    twin.weight.data.copy_(layer.weight.data)
    dense = layer.weight.detach().clone()
    x = correlated(1024, 256, 2)
    probe, pruner = budget.SizeProbe(layer, mode="fast", keep_bits=None), AdmmPruner(twin, mode="fast", keep_bits=None)
    probe.add_batch(x)
    pruner.add_batch(x)
    table = {tuple(r[:3]): r[3] for r in probe.fasterprune()["settings"]}
    pruner.fasterprune(0.5)
    energy = quadratic_trace(pruner.H, dense)
    for keep_bits, keep_proportion in [(1, 0.0), (2, 0.02), (3, 0.05)]:
        stored = apply_keepbits(twin.weight.detach(), pruner.scaler, keep_bits, keep_proportion).half().float()
        exact = math.sqrt(quadratic_trace(pruner.H, stored - dense) / energy)
        assert table[(0.5, keep_bits, keep_proportion)] == pytest.approx(exact, rel=1e-3)


WINDOWS = torch.randint(0, 96, (12, 48), generator=torch.Generator().manual_seed(1))


def mantissa_bits_used(w: torch.Tensor) -> torch.Tensor:
    """Per entry: how many of the float16 mantissa's 10 bits are needed (0 for a zero)."""
    bits = w.to(torch.float16).view(torch.int16).to(torch.int32) & 0x3FF
    trailing = torch.zeros_like(bits)
    for b in range(10):
        trailing += ((bits >> b) & 1 == 0) & (trailing == b)
    return torch.where(bits == 0, 0, 10 - trailing)


@pytest.mark.parametrize("preset", [None, "best"])
def test_a_budget_is_met_with_each_layers_settings(preset):
    model = tiny_llama(hidden=64, vocab=96)
    options = dict(target_bits_per_weight=4.5)
    config = FloatSparseConfig.from_preset(preset, **options) if preset else FloatSparseConfig(**options)
    result = prune_blocks(model, WINDOWS, config, progress=False)
    assert result.budget["target_bits_per_weight"] == 4.5
    assert 4.3 <= result.budget["predicted_bits_per_weight"] <= 4.5
    total = TensorSize()
    for row in result.rows:
        w = model.get_submodule(row["name"]).weight.detach()
        total = total + measure_tensor(w)
        chosen = result.layer_options[row["name"]]
        assert (row["keep_bits"], row["keep_proportion"]) == (chosen["keep_bits"], chosen["keep_proportion"])
        assert abs(row["sparsity"] - result.ratios[row["name"]]) < 0.02, row["name"]
        if row["keep_bits"] is not None:  # rounded to its own keep bits, bar its kept proportion
            wider = (mantissa_bits_used(w) > row["keep_bits"]).float().mean().item()
            assert wider <= row["keep_proportion"] + 1e-3, row["name"]
    measured = 8 * total.compressed_bytes / total.numel
    assert measured == pytest.approx(4.5, rel=0.05)  # the final weights compress about as the probe's did


def test_budget_refusals():
    with pytest.raises(ConfigError, match="must not be set"):
        FloatSparseConfig(0.5, target_bits_per_weight=4)
    with pytest.raises(ConfigError, match="unstructured"):
        FloatSparseConfig(mask_structure="2:4", target_bits_per_weight=4)
    with pytest.raises(ConfigError, match="allocation"):
        FloatSparseConfig(allocation="error", target_bits_per_weight=4)
    with pytest.raises(ConfigError, match="at most 16"):
        FloatSparseConfig(target_bits_per_weight=20)
    assert FloatSparseConfig(target_bits_per_weight=4).sparse_ratio is None
    with pytest.raises(ValueError, match="make_pruner"):
        prune_model(tiny_llama(1, hidden=64, vocab=96), WINDOWS, FloatSparseConfig(target_bits_per_weight=4),
                    make_pruner=lambda name, layer: AdmmPruner(layer), progress=False)
    with pytest.raises(ValueError, match="below the smallest size"):
        prune_model(tiny_llama(1, hidden=64, vocab=96), WINDOWS, FloatSparseConfig(target_bits_per_weight=0.5),
                    progress=False)


def test_the_command_line_takes_a_budget_without_the_default_ratio():
    from admm_sparse.cli import _config, _parser

    args = _parser().parse_args(["prune", "--target-bits-per-weight", "4.2", "--preset", "best"])
    config = _config(args)
    assert config.target_bits_per_weight == 4.2 and config.sparse_ratio is None and config.sequential
    assert math.isclose(_config(_parser().parse_args(["prune", "--sparse-ratio", "0.4"])).sparse_ratio, 0.4)


def test_rounding_to_one_keep_bit_uses_one_mantissa_bit():
    w = torch.randn(64, 64)
    assert int(mantissa_bits_used(round_float16(w, None, 1)).max()) <= 1
