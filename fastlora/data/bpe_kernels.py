"""Validated, allocating wrappers around the BPE kernels in csrc/bpe.pyx.

Same signatures as the plain-Python twins in fastlora.reference.bpe (and the same input
checks, which live there): words go in end to end as (sym, offsets[, counts]), merges come
out as an (M, 2) int32 array where merge r creates id n_base + r.
"""
import numpy as np

from fastlora._ext import bpe as _bpe
from fastlora.checks import check_merges, check_sizes, check_words


def _power_of_two_at_least(n):
    return 1 << max(1, int(n - 1).bit_length())


def train_merges(sym, offsets, counts, n_base, num_merges, min_count=1):
    """Learn up to num_merges merges from weighted words -> (merges (M, 2) int32, counts (M,) int64).

    Stops early when the most frequent pair occurs fewer than min_count times (or no pair is
    left). Ties go to the smallest (left, right) pair, so the result is deterministic.
    """
    check_sizes(n_base, num_merges, min_count)
    sym, offsets, counts = check_words(sym, offsets, counts, n_base)
    lengths = np.diff(offsets)
    # every pair occurrence that ever exists is either in the input or made by one merge
    # step (at most two per step, and there are fewer steps than input pairs): that bounds
    # the pair slots, the position entries and the heap alike
    initial_pairs = int(np.maximum(lengths - 1, 0).sum())
    P = 3 * initial_pairs + 1
    C = _power_of_two_at_least(2 * P)
    N = len(sym)
    merges = np.zeros((num_merges, 2), dtype=np.int32)
    merge_counts = np.zeros(num_merges, dtype=np.int64)
    work = sym.copy()  # the kernel rewrites the words as it merges

    def i32(n):
        return np.empty(n, dtype=np.int32)

    def i64(n):
        return np.empty(n, dtype=np.int64)

    done = _bpe.bpe_train(merges, merge_counts, work, offsets, counts, int(n_base), int(min_count),
                          i32(N), i32(N), i32(N), i32(N),                  # prv nxt word scratch
                          i64(C), i32(C),                                  # hash table
                          i64(P), i64(P), i32(P), i32(P), i32(P),          # pair slots, touched
                          i32(P), i32(P), i64(P), i32(P))                  # entries, heap
    if done < 0:
        raise RuntimeError("bpe_train ran out of workspace; the size bound in "
                           "fastlora/data/bpe_kernels.py is wrong (please report this)")
    return merges[:done].copy(), merge_counts[:done].copy()


class MergeTable:
    """The encoder's pair -> rank lookup, built once per merge list by build_merge_table.

    keys (C,) int64 pair keys (-1 = empty) and ranks (C,) int32, C a power of two; it also
    remembers n_base and how many merges it holds, so encode_words can trust a table that
    matches instead of re-checking all the merges on every call.
    """

    __slots__ = ("keys", "ranks", "n_base", "n_merges")

    def __init__(self, keys, ranks, n_base, n_merges):
        self.keys, self.ranks, self.n_base, self.n_merges = keys, ranks, n_base, n_merges


def build_merge_table(merges, n_base):
    """Check the merges and build their MergeTable."""
    check_sizes(n_base, 0)
    merges = check_merges(merges, n_base)
    C = _power_of_two_at_least(2 * len(merges) + 2)  # at most half full: short probe chains
    keys = np.empty(C, dtype=np.int64)
    ranks = np.empty(C, dtype=np.int32)
    _bpe.bpe_build_table(keys, ranks, merges)
    return MergeTable(keys, ranks, int(n_base), len(merges))


def encode_words(sym, offsets, merges, n_base, table=None):
    """Apply the merges to each word -> (ids int32, out_offsets (W + 1,) int64).

    Word k's tokens are ids[out_offsets[k]:out_offsets[k + 1]]. Pass table =
    build_merge_table(merges, n_base) to reuse the lookup across calls: the merges were
    checked when it was built, so only its size is compared with `merges` here (it must come
    from these same merges).
    """
    if table is None:
        table = build_merge_table(merges, n_base)
    elif not isinstance(table, MergeTable):
        raise TypeError(f"table must be a MergeTable from build_merge_table, got "
                        f"{type(table).__name__}")
    elif (table.n_base, table.n_merges) != (n_base, len(merges)):
        raise ValueError(f"table was built for n_base={table.n_base} and {table.n_merges} "
                         f"merges, not n_base={n_base} and {len(merges)} merges")
    sym, offsets, _ = check_words(sym, offsets, None, n_base + table.n_merges)
    keys, ranks = table.keys, table.ranks
    longest = int(np.diff(offsets).max()) if len(offsets) > 1 else 0
    out = np.empty(len(sym), dtype=np.int32)
    out_offsets = np.empty(len(offsets), dtype=np.int64)
    L = max(longest, 1)
    _bpe.bpe_encode(out, out_offsets, sym, offsets, keys, ranks, int(n_base),
                    np.empty(L, dtype=np.int32), np.empty(L, dtype=np.int32),
                    np.empty(3 * L, dtype=np.int64))  # the long-word heap: <= 3 pushes per symbol
    return out[:out_offsets[-1]].copy(), out_offsets
