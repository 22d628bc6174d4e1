"""Plain-Python twin of csrc/bpe.pyx: learn BPE merges by recounting, apply them one by one.

Words arrive end to end, as the kernel takes them: sym (N,) symbol ids, offsets (W + 1,)
with word k in sym[offsets[k]:offsets[k + 1]], counts (W,) how often each word occurs. Ids
below n_base are the base alphabet; merge r joins the pair merges[r] into id n_base + r.

Training recounts every adjacent pair (weighted by word counts) before each merge, takes the
most frequent one (ties: the smallest (left, right)), stops at num_merges or when the best
count is below min_count, and rewrites each word left to right. Encoding applies merge 0,
then merge 1, ... to each word, each left to right: the definition of BPE, at O(M * L) a word.

The input checks live in fastlora.checks, which the fast wrappers in fastlora.data.bpe_kernels
call too, so both paths refuse the same bad input with the same message.
"""
from collections import Counter

import numpy as np

from fastlora.checks import check_merges, check_sizes, check_words


def _merge_word(word, a, b, z):
    """Replace each (a, b) in `word` by z, left to right (so "aaa" with (a, a) gives "za")."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(z)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_merges(sym, offsets, counts, n_base, num_merges, min_count=1):
    """-> (merges (M, 2) int32, merge_counts (M,) int64), M <= num_merges."""
    check_sizes(n_base, num_merges, min_count)
    sym, offsets, counts = check_words(sym, offsets, counts, n_base)
    words = [sym[offsets[k]:offsets[k + 1]].tolist() for k in range(len(counts))]
    weights = counts.tolist()
    merges, merge_counts = [], []
    for r in range(num_merges):
        pairs = Counter()
        for word, weight in zip(words, weights):
            for pair in zip(word, word[1:]):
                pairs[pair] += weight
        if not pairs:
            break
        (a, b), best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if best < min_count:
            break
        words = [_merge_word(word, a, b, n_base + r) for word in words]
        merges.append((a, b))
        merge_counts.append(best)
    return (np.array(merges, dtype=np.int32).reshape(-1, 2),
            np.array(merge_counts, dtype=np.int64))


def build_merge_table(merges, n_base):
    """The fast path's lookup table; the reference needs none and returns the checked merges."""
    check_sizes(n_base, 0)
    return check_merges(merges, n_base)


def encode_words(sym, offsets, merges, n_base, table=None):
    """-> (ids int32, out_offsets (W + 1,) int64): word k's tokens are ids[out_offsets[k]:out_offsets[k + 1]].

    `table` (the fast path's lookup cache) is accepted for the same signature and unused.
    """
    check_sizes(n_base, 0)
    merges = check_merges(merges, n_base)
    sym, offsets, _ = check_words(sym, offsets, None, n_base + len(merges))
    ids, out_offsets = [], [0]
    for k in range(len(offsets) - 1):
        word = sym[offsets[k]:offsets[k + 1]].tolist()
        for r, (a, b) in enumerate(merges.tolist()):
            word = _merge_word(word, a, b, n_base + r)
        ids.extend(word)
        out_offsets.append(len(ids))
    return np.array(ids, dtype=np.int32), np.array(out_offsets, dtype=np.int64)
