"""Validated, allocating wrappers around the BPE kernels in csrc/bpe.pyx.

Same signatures as the plain-Python twins in fastlora.reference.bpe (and the same input
checks, which live there): words go in end to end as (sym, offsets[, counts]), merges come
out as an (M, 2) int32 array where merge r creates id n_base + r.
"""
import numpy as np

from fastlora._ext import bpe as _bpe
from fastlora.reference.bpe import check_merges, check_sizes, check_words


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


def build_merge_table(merges, n_base):
    """The encoder's pair -> rank lookup: (keys (C,) int64, ranks (C,) int32), C a power of two."""
    check_sizes(n_base, 0)
    merges = check_merges(merges, n_base)
    C = _power_of_two_at_least(2 * len(merges) + 2)  # at most half full: short probe chains
    keys = np.empty(C, dtype=np.int64)
    ranks = np.empty(C, dtype=np.int32)
    _bpe.bpe_build_table(keys, ranks, merges)
    return keys, ranks


def _check_table(table):
    if not (isinstance(table, tuple) and len(table) == 2):
        raise TypeError("table must be the (keys, ranks) pair that build_merge_table returns")
    keys, ranks = table
    if not (isinstance(keys, np.ndarray) and keys.dtype == np.int64 and keys.ndim == 1
            and isinstance(ranks, np.ndarray) and ranks.dtype == np.int32
            and ranks.shape == keys.shape and len(keys) >= 2 and len(keys) & (len(keys) - 1) == 0
            and keys.flags.c_contiguous and ranks.flags.c_contiguous):
        raise ValueError("table must be the (keys, ranks) pair that build_merge_table returns")
    return keys, ranks


def encode_words(sym, offsets, merges, n_base, table=None):
    """Apply the merges to each word -> (ids int32, out_offsets (W + 1,) int64).

    Word k's tokens are ids[out_offsets[k]:out_offsets[k + 1]]. Pass table =
    build_merge_table(merges, n_base) to reuse the lookup across calls (it must come from the same
    merges).
    """
    check_sizes(n_base, 0)
    merges = check_merges(merges, n_base)
    sym, offsets, _ = check_words(sym, offsets, None, n_base + len(merges))
    keys, ranks = _check_table(build_merge_table(merges, n_base) if table is None else table)
    longest = int(np.diff(offsets).max()) if len(offsets) > 1 else 0
    out = np.empty(len(sym), dtype=np.int32)
    out_offsets = np.empty(len(offsets), dtype=np.int64)
    _bpe.bpe_encode(out, out_offsets, sym, offsets, keys, ranks, int(n_base),
                    np.empty(max(longest, 1), dtype=np.int32),
                    np.empty(max(longest, 1), dtype=np.uint8))
    return out[:out_offsets[-1]].copy(), out_offsets
