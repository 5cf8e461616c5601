"""admm_sparse: ADMM post-training pruning of nn.Linear weights (msModelSlim float_sparse, W16A16S).

    import admm_sparse
    report = admm_sparse.prune_linear(layer, X, 0.3)   # prunes layer.weight in place
"""
from . import _ops as ops
from .layer import DEFAULT_OPTIONS, AdmmPruner, PruneReport, prune_linear

__all__ = ["AdmmPruner", "PruneReport", "prune_linear", "DEFAULT_OPTIONS", "ops"]
__version__ = "0.1.0"
