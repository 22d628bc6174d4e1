"""csrc/bpe.pyx against its recounting twin fastlora/reference/bpe.py: same merges, same ids,
same refusals."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlora.data import bpe_kernels as fast
from fastlora.reference import bpe as slow


def _words(lists):
    sym = np.array([s for w in lists for s in w], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(w) for w in lists])]).astype(np.int64)
    return sym, offsets


@st.composite
def corpora(draw):
    """Words over a tiny alphabet (so pairs repeat and overlap, like "aaaa"), with counts."""
    n_base = draw(st.integers(1, 5))
    lists = draw(st.lists(st.lists(st.integers(0, n_base - 1), max_size=14), max_size=25))
    counts = draw(st.lists(st.integers(1, 6), min_size=len(lists), max_size=len(lists)))
    return lists, counts, n_base


@settings(max_examples=150, deadline=None)
@given(corpora(), st.integers(0, 40), st.integers(1, 3))
def test_train_and_encode_match_the_reference(corpus, num_merges, min_count):
    lists, counts, n_base = corpus
    sym, offsets = _words(lists)
    got = fast.train_merges(sym, offsets, counts, n_base, num_merges, min_count)
    want = slow.train_merges(sym, offsets, counts, n_base, num_merges, min_count)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0].dtype == np.int32 and got[1].dtype == np.int64
    # encoding the training words replays the training, and matches the twin
    for a, b in zip(fast.encode_words(sym, offsets, got[0], n_base),
                    slow.encode_words(sym, offsets, want[0], n_base)):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=100, deadline=None)
@given(corpora(), corpora())
def test_encoding_unseen_words_matches_the_reference(train, other):
    lists, counts, n_base = train
    merges, _ = fast.train_merges(*_words(lists), counts, n_base, 30, 1)
    words = [[s % n_base for s in w] for w in other[0]]
    sym, offsets = _words(words)
    table = fast.build_merge_table(merges, n_base)
    for a, b in zip(fast.encode_words(sym, offsets, merges, n_base, table),
                    slow.encode_words(sym, offsets, merges, n_base)):
        np.testing.assert_array_equal(a, b)


def test_overlapping_pairs_merge_left_to_right():
    # "aaa" (x2) and "aaaa": (a, a) first; "aaa" -> "Za", "aaaa" -> "ZZ"; then (Z, a) x2 vs (Z, Z) x1
    sym, offsets = _words([[0, 0, 0], [0, 0, 0, 0]])
    merges, counts = fast.train_merges(sym, offsets, [2, 1], 1, 5, 1)
    assert merges.tolist() == [[0, 0], [1, 0], [1, 1]]
    assert counts.tolist() == [2 * 2 + 3, 2, 1]
    # a a a a a -> Z Z a -> Z (Z a): merge 1 (Z, a) outranks merge 2 (Z, Z)
    for mod in (fast, slow):
        ids, out = mod.encode_words(*_words([[0, 0, 0, 0, 0]]), merges, 1)
        assert ids.tolist() == [1, 2] and out.tolist() == [0, 2]


def test_ties_go_to_the_smallest_pair_and_counts_are_weighted():
    sym, offsets = _words([[2, 3], [0, 1], [1, 0]])
    merges, counts = fast.train_merges(sym, offsets, [5, 5, 7], 4, 3, 1)
    assert merges.tolist() == [[1, 0], [0, 1], [2, 3]] and counts.tolist() == [7, 5, 5]


def test_long_words_of_one_symbol_do_not_exhaust_the_workspace():
    # the worst case for the occurrence lists: every merge touches almost every position
    sym, offsets = _words([[0] * 3000, [0] * 1777])
    got = fast.train_merges(sym, offsets, [3, 1], 1, 40, 1)
    want = slow.train_merges(sym, offsets, [3, 1], 1, 40, 1)
    np.testing.assert_array_equal(got[0], want[0])


def test_empty_inputs():
    for mod in (fast, slow):
        merges, counts = mod.train_merges([], [0], [], 3, 10)
        assert merges.shape == (0, 2) and counts.shape == (0,)
        ids, out = mod.encode_words([], [0], np.zeros((0, 2), np.int32), 3)
        assert ids.shape == (0,) and out.tolist() == [0]
        ids, out = mod.encode_words([1, 2], [0, 0, 2, 2], np.zeros((0, 2), np.int32), 3)
        assert ids.tolist() == [1, 2] and out.tolist() == [0, 0, 2, 2]


def test_non_contiguous_and_other_integer_dtypes_are_accepted():
    sym, offsets = _words([[0, 1, 0, 1], [1, 0, 1]])
    strided = np.repeat(sym.astype(np.int16), 2)[::2]
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(fast.train_merges(strided, offsets, [1, 1], 2, 4, 1)[0],
                                  slow.train_merges(sym, offsets, [1, 1], 2, 4, 1)[0])


BAD_TRAIN = [
    (([0, 5], [0, 2], [1], 3, 1), ValueError, r"sym\[1\] = 5 is outside \[0, 3\)"),
    (([0, 1], [0, 1], [1], 3, 1), ValueError, "offsets must start at 0 and end at len"),
    (([0, 1, 2], [0, 2, 1, 3], [1, 1, 1], 3, 1), ValueError, r"offsets\[1\] = 2 > offsets\[2\]"),
    (([0, 1], [0, 2], [0], 3, 1), ValueError, r"counts\[0\] = 0 must be >= 1"),
    (([0, 1], [0, 2], [1, 1], 3, 1), ValueError, "one entry per word"),
    (([0.0, 1.0], [0, 2], [1], 3, 1), TypeError, "sym must be an integer array"),
    (([0, 1], [0, 2], [1], 0, 1), ValueError, "n_base must be an int >= 1"),
    (([0, 1], [0, 2], [1], 3, -1), ValueError, "num_merges must be an int >= 0"),
]


@pytest.mark.parametrize("args, exc, message", BAD_TRAIN)
def test_both_refuse_the_same_bad_training_input(args, exc, message):
    for mod in (fast, slow):
        with pytest.raises(exc, match=message):
            mod.train_merges(*args)


@pytest.mark.parametrize("merges, message", [
    ([[0, 3]], r"merges\[0, 1\] = 3 is outside \[0, 3\)"),
    ([[0, 1], [3, 4]], r"merges\[1, 1\] = 4 is outside \[0, 4\)"),
    ([[0, 1, 2]], r"merges must have shape \(M, 2\)"),
])
def test_both_refuse_the_same_bad_merges(merges, message):
    for mod in (fast, slow):
        with pytest.raises(ValueError, match=message):
            mod.encode_words([0, 1], [0, 2], merges, 3)


def test_a_foreign_or_mismatched_table_is_refused():
    with pytest.raises(TypeError, match="table must be a MergeTable"):
        fast.encode_words([0, 1], [0, 2], [[0, 1]], 3, (np.zeros(4, np.int64), np.zeros(4, np.int32)))
    table = fast.build_merge_table([[0, 1]], 3)
    with pytest.raises(ValueError, match="built for n_base=3 and 1 merges, not n_base=3 and 2"):
        fast.encode_words([0, 1], [0, 2], [[0, 1], [3, 2]], 3, table)
    with pytest.raises(ValueError, match=r"sym\[1\] = 4 is outside \[0, 4\)"):
        fast.encode_words([0, 4], [0, 2], [[0, 1]], 3, table)
