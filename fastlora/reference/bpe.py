"""Plain-Python twin of csrc/bpe.pyx: learn BPE merges by recounting, apply them one by one.

Words arrive end to end, as the kernel takes them: sym (N,) symbol ids, offsets (W + 1,)
with word k in sym[offsets[k]:offsets[k + 1]], counts (W,) how often each word occurs. Ids
below n_base are the base alphabet; merge r joins the pair merges[r] into id n_base + r.

Training recounts every adjacent pair (weighted by word counts) before each merge, takes the
most frequent one (ties: the smallest (left, right)), stops at num_merges or when the best
count is below min_count, and rewrites each word left to right. Encoding applies merge 0,
then merge 1, ... to each word, each left to right: the definition of BPE, at O(M * L) a word.

The input checks live here too and the fast wrappers in fastlora.data.bpe_kernels call
them, so both paths refuse the same bad input with the same message.
"""
from collections import Counter

import numpy as np

MAX_ID = 2**31 - 1  # ids and positions are int32 in the kernel


def _int_array(name, a, ndim):
    a = np.asarray(a)
    if a.size == 0 and a.dtype.kind not in "iu":
        a = a.astype(np.int64)  # np.asarray([]) is float64; an empty list is still valid
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return a


def check_words(sym, offsets, counts, id_limit):
    """Validate words given end to end; return (sym int32, offsets int64, counts int64 or None).

    Every symbol must lie in [0, id_limit); offsets start at 0, never decrease and end at
    len(sym); counts (if not None) has one entry >= 1 per word.
    """
    sym = _int_array("sym", sym, 1)
    offsets = _int_array("offsets", offsets, 1)
    if len(sym) >= MAX_ID:
        raise ValueError(f"sym has {len(sym)} symbols; at most {MAX_ID - 1} fit int32 positions")
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(sym):
        raise ValueError(f"offsets must start at 0 and end at len(sym) = {len(sym)}, got "
                         f"{offsets[:1].tolist()} ... {offsets[-1:].tolist()}")
    if np.any(np.diff(offsets) < 0):
        k = int(np.argmax(np.diff(offsets) < 0))
        raise ValueError(f"offsets must not decrease: offsets[{k}] = {int(offsets[k])} > "
                         f"offsets[{k + 1}] = {int(offsets[k + 1])}")
    if len(sym) and (sym.min() < 0 or sym.max() >= id_limit):
        i = int(np.argmax((sym < 0) | (sym >= id_limit)))
        raise ValueError(f"sym[{i}] = {int(sym[i])} is outside [0, {id_limit})")
    if counts is not None:
        counts = _int_array("counts", counts, 1)
        if len(counts) != len(offsets) - 1:
            raise ValueError(f"counts must have one entry per word ({len(offsets) - 1}), "
                             f"got {len(counts)}")
        if len(counts) and counts.min() < 1:
            k = int(np.argmin(counts))
            raise ValueError(f"counts[{k}] = {int(counts[k])} must be >= 1")
        counts = np.ascontiguousarray(counts, dtype=np.int64)
    return (np.ascontiguousarray(sym, dtype=np.int32),
            np.ascontiguousarray(offsets, dtype=np.int64), counts)


def check_merges(merges, n_base):
    """Validate a (M, 2) merge list: merge r may only join ids below n_base + r."""
    merges = _int_array("merges", np.asarray(merges).reshape(-1, 2) if np.size(merges) == 0
                        else merges, 2)
    if merges.shape[1] != 2:
        raise ValueError(f"merges must have shape (M, 2), got {merges.shape}")
    limit = n_base + np.arange(len(merges))
    bad = (merges < 0) | (merges >= limit[:, None])
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"merges[{r}, {c}] = {int(merges[r, c])} is outside [0, {n_base + r}): "
                         f"merge {r} may only join the alphabet and earlier merges")
    return np.ascontiguousarray(merges, dtype=np.int32)


def check_sizes(n_base, num_merges=0, min_count=1):
    for name, value, low in [("n_base", n_base, 1), ("num_merges", num_merges, 0),
                             ("min_count", min_count, 1)]:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if n_base + num_merges > MAX_ID:
        raise ValueError(f"n_base + num_merges = {n_base + num_merges} exceeds the int32 id range")


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
