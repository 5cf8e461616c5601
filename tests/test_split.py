"""admm_sparse.split: one layer's ADMM over several ranks by output rows, against one process. The ranks run as
threads of this process around a group whose collectives meet at a barrier (the real torch.distributed run is
tests/test_distributed.py's)."""
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from admm_sparse import _ops, reference, split
from admm_sparse.distributed import split_layers


class ThreadGroup:
    """Rank `rank` of `size` threads: sum() and broadcast() wait for every rank, like torch.distributed's."""

    def __init__(self, rank, size, board):
        self.rank, self.size, self.board, self.calls = rank, size, board, 0

    def _meet(self, tensor):
        key = self.calls
        self.calls += 1
        with self.board["lock"]:
            self.board.setdefault(key, [None] * self.size)[self.rank] = tensor.clone()
        self.board["barrier"].wait()
        return self.board[key]

    def sum(self, tensor):
        parts = self._meet(tensor)
        tensor.copy_(sum(parts))
        self.board["barrier"].wait()
        return tensor

    def broadcast(self, tensor, owner):
        tensor.copy_(self._meet(tensor)[owner])
        self.board["barrier"].wait()


def on_ranks(size, fn):
    """fn(group) on `size` thread ranks; their results in rank order."""
    board = {"lock": threading.Lock(), "barrier": threading.Barrier(size)}
    results, errors = [None] * size, []

    def run(rank):
        try:
            results[rank] = fn(ThreadGroup(rank, size, board))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            board["barrier"].abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@settings(max_examples=60, deadline=None)
@given(d_in=st.integers(1, 30), d_out=st.integers(1, 20), ranks=st.integers(1, 4), k_frac=st.floats(0, 1),
       levels=st.sampled_from([0, 3, 50]), seed=st.integers(0, 2**16))
def test_the_histogram_reduced_select_is_the_global_select(d_in, d_out, ranks, k_frac, levels, seed):
    """Each sweep's histogram summed over the ranks, ties placed by their count per row: the k smallest of the
    whole matrix with ties to the lower flat index, as prune_mask chooses them."""
    ranks = min(ranks, d_out)
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(d_in, d_out, generator=g)
    if levels:  # few distinct values: many ties, some of them across ranks
        values = torch.randint(-levels, levels + 1, (d_in, d_out), generator=g).float()
    k = int(k_frac * values.numel())
    slices = split.column_slices(d_out, ranks)
    parts = on_ranks(ranks, lambda group: split.global_smallest(
        values[:, slices[group.rank][0]:slices[group.rank][1]].contiguous(), k, group))
    assert torch.equal(torch.cat(parts, 1), reference.prune_mask(values, k))


@pytest.mark.parametrize("structure,ratio", [("unstructured", 0.5), ("unstructured", 0.9), ("per_row", 0.5),
                                             ("2:4", 0.5)])
@pytest.mark.parametrize("ranks", [2, 3])
def test_a_split_layer_prunes_as_one_process(structure, ratio, ranks):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 64, generator=g) @ (torch.randn(64, 64, generator=g) / 8 + torch.eye(64))
    h = (x.T @ x).tril()
    w = torch.randn(30, 64, generator=g)
    k = w.numel() // 2 if structure == "2:4" else (30 * int(64 * ratio) if structure == "per_row"
                                                    else int(w.numel() * ratio))
    whole, damping, energy = _ops.admm_prune(h, w, k, 0.1, 1.0, 20, 15, structure)
    results = on_ranks(ranks, lambda group: split.admm_prune_split(h, w, k, 0.1, 1.0, 20, 15, structure, group))
    for out, split_damping, split_energy in results:  # every rank holds the whole weight
        assert torch.equal(out == 0, whole == 0) and int((out == 0).sum()) == k
        torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-6 * whole.abs().max().item())
        torch.testing.assert_close(split_damping, damping)
        torch.testing.assert_close(split_energy, energy, rtol=1e-5, atol=0)


def test_which_layers_are_split():
    # the built-in model's block: q, k, v, o, gate, up, down (down costs ~40% of the block)
    costs = [6.9, 2.3, 2.3, 6.9, 18.0, 18.0, 38.0]
    assert split_layers(costs, 1) == set() and split_layers(costs, 2) == set()
    assert split_layers(costs, 3) == {6} and split_layers(costs, 8) == {4, 5, 6}
    assert split_layers([5.0], 2) == {0}  # a lone layer is shared by both ranks


def test_column_slices_cover_every_row_once():
    for d_out, ranks in [(1, 1), (7, 3), (5, 5), (4096, 8)]:
        slices = split.column_slices(d_out, ranks)
        assert slices[0][0] == 0 and slices[-1][1] == d_out
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        assert max(e - s for s, e in slices) - min(e - s for s, e in slices) <= 1
