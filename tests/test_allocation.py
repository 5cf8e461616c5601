"""Sparsity allocation by measured error (config.allocation = "error"): the exact global count, the optimum of
the interpolated errors, the probe pass, and the option's errors."""
import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from admm_sparse.allocation import ErrorProbe, lower_hull, allocate, allocated_ratios, grid, ratio_for_count
from admm_sparse.config import ConfigError, FloatSparseConfig, parse_config
from admm_sparse.layer import pruned_count
from admm_sparse import pipeline
from admm_sparse.pipeline import prune_blocks
from admm_sparse.plan import make_plan
from test_pipeline import tiny_model, token_windows


def uniform_total(shapes, ratio):
    return sum(pruned_count(s, ratio, "unstructured") for s in shapes.values())


def interpolated(points, k):
    """The hull's piecewise-linear error at count k."""
    hull = lower_hull(sorted(points))
    if len(hull) == 1:
        return hull[0][1]
    for (x1, y1), (x2, y2) in zip(hull, hull[1:]):
        if x1 <= k <= x2:
            return y1 + (y2 - y1) * (k - x1) / (x2 - x1)
    raise AssertionError(f"{k} outside the hull")


shapes_st = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3)


@settings(max_examples=150, deadline=None)
@given(shapes=shapes_st, ratio=st.sampled_from([0.05, 0.3, 0.5, 0.7, 0.9]), data=st.data())
def test_allocation_hits_the_uniform_total_and_the_optimum(shapes, ratio, data):
    shapes = {f"l{i}": s for i, s in enumerate(shapes)}
    ratios = grid(ratio)
    errors = {n: sorted(data.draw(st.lists(st.floats(0, 1), min_size=len(ratios), max_size=len(ratios))))
              for n in shapes}
    counts = allocate(shapes, errors, ratios, ratio)
    assert sum(counts.values()) == uniform_total(shapes, ratio)
    # the objective: each layer's squared relative error, weighted by its number of weights
    points = {n: list({pruned_count(shapes[n], r, "unstructured"): shapes[n][0] * shapes[n][1] * e * e
                       for r, e in zip(ratios, errors[n])}.items()) for n in shapes}
    ranges = {n: range(min(p)[0], max(p)[0] + 1) for n, p in points.items()}
    assert all(counts[n] in ranges[n] for n in shapes)
    # the optimum of the interpolated (convex-hull) errors over every integer split with the same total
    best = min(sum(interpolated(points[n], k) for n, k in zip(shapes, split))
               for split in itertools.product(*ranges.values()) if sum(split) == uniform_total(shapes, ratio))
    assert sum(interpolated(points[n], counts[n]) for n in shapes) == pytest.approx(best, abs=1e-9)


def test_a_sensitive_layer_gets_fewer_zeros_and_equal_layers_stay_uniform():
    shapes = {"a": (10, 10), "b": (10, 10)}
    ratios = grid(0.5)
    steep = [0.1 + r * r for r in ratios]
    flat = [r * 0.2 for r in ratios]
    assert allocate(shapes, {"a": steep, "b": flat}, ratios, 0.5, weights={"a": 1.0, "b": 1e-6})["b"] == 65
    counts = allocate(shapes, {"a": steep, "b": flat}, ratios, 0.5)
    assert counts["a"] < 50 < counts["b"] and counts["a"] + counts["b"] == 100
    assert allocate(shapes, {"a": steep, "b": steep}, ratios, 0.5) == {"a": 50, "b": 50}
    # a layer without measurements (no calibration tokens reached it) keeps the uniform count
    assert allocate(shapes, {"b": flat}, ratios, 0.5) == {"a": 50, "b": 50}


@pytest.mark.parametrize("numel", [1, 7, 1000, 4096 * 11008, 18432 * 7168])
def test_ratio_for_count_gives_the_count_exactly(numel):
    shape = (numel // 7 or 1, 7) if numel % 7 == 0 else (1, numel)
    for count in {0, 1, numel // 3, numel - 1}:
        assert pruned_count(shape, ratio_for_count(shape, count), "unstructured") == count


def test_grid_brackets_the_ratio_within_bounds():
    assert grid(0.5) == pytest.approx([0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65])
    assert grid(0.05) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert max(grid(0.9)) == pytest.approx(0.95) and max(grid(0.97)) == pytest.approx(0.97)


def test_the_probe_measures_growing_errors_and_leaves_the_weight_dense():
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 16)
    dense = layer.weight.detach().clone()
    probe = ErrorProbe(layer, [0.0, 0.3, 0.6, 0.9], mode="fast", keep_bits=None)
    probe.add_batch(torch.randn(4, 32, 24))
    report = probe.fasterprune(0.5)
    assert torch.equal(layer.weight, dense)
    assert report["errors"][0] == 0 and report["errors"] == sorted(report["errors"]) and report["errors"][-1] > 0


def test_whole_model_allocation_keeps_the_total_and_spreads_it(monkeypatch):
    model = tiny_model(layers=2)
    windows = token_windows(8, 32)
    original = copy.deepcopy(model)
    config = FloatSparseConfig(0.6, keep_bits=None, allocation="error")
    shapes = {n: tuple(t.shape) for n, t in make_plan(model, config).targets.items()}
    result = prune_blocks(model, windows, config, progress=False)
    zeros = {r["name"]: round(r["sparsity"] * shapes[r["name"]][0] * shapes[r["name"]][1]) for r in result.rows}
    assert sum(zeros.values()) == uniform_total(shapes, 0.6)
    assert all(zeros[n] == pruned_count(shapes[n], result.ratios[n], "unstructured") for n in shapes)
    assert len({round(r, 3) for r in result.ratios.values()}) > 1  # not the uniform split
    # The probe pass left the model dense: pruning the original with those ratios directly gives the same model.
    monkeypatch.setattr(pipeline, "_layer_ratios", lambda *args: dict(result.ratios))
    direct = prune_blocks(original, windows, FloatSparseConfig(0.6, keep_bits=None), progress=False)
    assert [r["sparsity"] for r in direct.rows] == [r["sparsity"] for r in result.rows]
    for (name, a), b in zip(model.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), name


def test_allocated_ratios_checks_its_own_total():
    shapes = {"a": (3, 5), "b": (7, 2)}
    ratios = grid(0.5)
    rows = [{"name": "a", "errors": [r for r in ratios]}, {"name": "b", "errors": [2 * r for r in ratios]}]
    result = allocated_ratios(shapes, rows, ratios, 0.5)
    assert sum(pruned_count(shapes[n], r, "unstructured") for n, r in result.items()) == uniform_total(shapes, 0.5)


def test_allocation_needs_unstructured_masks_and_a_known_name():
    with pytest.raises(ConfigError, match="allocation.*unstructured.*uniform"):
        FloatSparseConfig(mask_structure="2:4", allocation="error")
    with pytest.raises(ConfigError, match="allocation.*per_row"):
        FloatSparseConfig(0.5, mask_structure="per_row", allocation="error")
    with pytest.raises(ConfigError, match=r"allocation: expected one of \['uniform', 'error'\]"):
        FloatSparseConfig(0.5, allocation="owl")
    doc = {"spec": {"process": [{"type": "float_sparse", "sparse_ratio": 0.5, "allocation": "error"}]}}
    assert parse_config(doc).allocation == "error"


def test_a_model_without_block_stack_is_allocated_too():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(300, 16), torch.nn.Linear(16, 48), torch.nn.ReLU(),
                                torch.nn.Linear(48, 24))
    config = FloatSparseConfig(0.5, keep_bits=None, allocation="error")
    result = prune_blocks(model, token_windows(8, 32), config, progress=False)
    shapes = {"1": (48, 16), "3": (24, 48)}
    zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in shapes)
    assert zeros == uniform_total(shapes, 0.5) and set(result.ratios) == set(shapes)
