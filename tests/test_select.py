"""Layer selection: fnmatch on full names, only prunable layers, exclude wins, one warning for unused patterns."""
import warnings

import pytest
from torch import nn

from admm_sparse.select import matches, select_targets
from admm_sparse.targets import find_targets


def modules():
    block = nn.Module()
    block.self_attn = nn.Module()
    block.self_attn.q_proj = nn.Linear(4, 4)
    block.mlp = nn.Module()
    block.mlp.up_proj = nn.Linear(4, 8)
    block.mlp.down_proj = nn.Linear(8, 4)
    block.norm = nn.LayerNorm(4)
    root = nn.Module()
    root.layers = nn.ModuleList([block])
    return list(root.named_modules())


def select(include=("*",), exclude=()):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return list(select_targets(find_targets(modules()), include, exclude))


def test_star_selects_every_linear_only_in_order():
    assert select() == ["layers.0.self_attn.q_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]


def test_exclude_wins_over_include():
    assert select(["*mlp*"], ["*down*"]) == ["layers.0.mlp.up_proj"]
    assert select(["*"], ["*self_attn*"]) == ["layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]
    assert select(["*up_proj"], ["*up_proj"]) == []


def test_patterns_match_full_names_case_sensitively():
    assert not matches("layers.0.mlp.up_proj", ["up_proj"])  # not a substring match
    assert matches("layers.0.mlp.up_proj", ["layers.?.mlp.*"])
    assert not matches("layers.0.mlp.up_proj", ["*UP_PROJ"])


def test_one_warning_names_every_unused_pattern_but_star():
    with pytest.warns(UserWarning) as record:
        got = select_targets(find_targets(modules()), ["*", "*typo*"], ["*gate_proj", "*norm"])
    assert len(record) == 1
    msg = str(record[0].message)
    # "*norm" matches a module, but not a prunable layer: it can never change what is pruned.
    assert "*typo*" in msg and "*gate_proj" in msg and "*norm" in msg and "'*'" not in msg
    assert len(got) == 3


def test_no_warning_when_all_patterns_used():
    assert select(["*"], ["*q_proj"]) == ["layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]
