"""Which nn.Linear layers a config selects: shell-style wildcards on full module names, exclude wins."""
from __future__ import annotations

import warnings
from fnmatch import fnmatchcase
from typing import Iterable

from torch import nn


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a full module name (e.g. "model.layers.0.mlp.up_proj") matches any pattern (case-sensitive)."""
    return any(fnmatchcase(name, p) for p in patterns)


def select_linears(modules: Iterable[tuple[str, nn.Module]], include: Iterable[str] = ("*",),
                   exclude: Iterable[str] = ()) -> dict[str, nn.Linear]:
    """The nn.Linear modules among `modules` (name, module) that match include and no exclude, in order.

    Warns once, naming every pattern (other than "*") that matches none of the candidate Linear layers:
    usually a typo or a name from another model family.
    """
    include, exclude = list(include), list(exclude)
    linears = [(name, m) for name, m in modules if isinstance(m, nn.Linear)]
    selected = {name: m for name, m in linears if matches(name, include) and not matches(name, exclude)}
    unused = [p for p in dict.fromkeys(include + exclude)
              if p != "*" and not any(fnmatchcase(name, p) for name, _ in linears)]
    if unused:
        example = linears[0][0] if linears else "none"
        warnings.warn(f"pattern(s) {unused} matched no prunable nn.Linear module (names look like {example!r})",
                      stacklevel=2)
    return selected
