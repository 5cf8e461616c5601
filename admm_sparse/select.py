"""Which layers a config selects: shell-style wildcards on full layer names, exclude wins."""
from __future__ import annotations

import warnings
from fnmatch import fnmatchcase
from typing import Iterable

from .targets import Target


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a full layer name (e.g. "model.layers.0.mlp.up_proj") matches any pattern (case-sensitive)."""
    return any(fnmatchcase(name, p) for p in patterns)


def select_targets(targets: Iterable[Target], include: Iterable[str] = ("*",),
                   exclude: Iterable[str] = ()) -> dict[str, Target]:
    """The prunable layers (admm_sparse.targets) that match include and no exclude, by name, in order.

    Warns once, naming every pattern (other than "*") that matches none of the prunable layers: usually a
    typo or a name from another model family.
    """
    include, exclude = list(include), list(exclude)
    targets = list(targets)
    selected = {t.name: t for t in targets if matches(t.name, include) and not matches(t.name, exclude)}
    unused = [p for p in dict.fromkeys(include + exclude)
              if p != "*" and not any(fnmatchcase(t.name, p) for t in targets)]
    if unused:
        example = targets[0].name if targets else "none"
        warnings.warn(f"pattern(s) {unused} matched no prunable layer (names look like {example!r})", stacklevel=2)
    return selected
