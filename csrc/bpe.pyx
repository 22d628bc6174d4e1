# cython: language_level=3
"""Byte-pair encoding: learn merges from word counts (train) and apply them to words (encode).

Words arrive end to end: sym (N,) symbol ids, offsets (W + 1,) with word k in
sym[offsets[k]:offsets[k + 1]], counts (W,) how often word k occurs in the corpus. Ids below
n_base are the base alphabet; merge r joins the pair merges[r] into the new id n_base + r.

Training keeps every pair's weighted count up to date as merges rewrite the words, instead
of recounting all N symbols per merge (which would be O(merges * N)):
  - the words live in one doubly linked list over positions (prv/nxt), so a merge deletes
    the right symbol in O(1);
  - an open-addressing hash table maps the pair key (left << 32 | right) to a pair slot that
    holds the count and a singly linked list of positions where the pair may start (entries
    go stale when a neighbour merges; they are checked when used, never removed);
  - a binary max-heap of (count, slot) picks the next merge. Counts that drop leave their old,
    larger entry in the heap; a popped entry that disagrees with the live count is re-pushed
    with the live count, so the first entry that agrees is the true maximum.
Ties go to the smallest (left, right) pair, which makes the result unique and lets the
recounting twin in fastlora/reference/bpe.py check it exactly.

The wrapper (fastlora/data/bpe_kernels.py) validates the inputs and allocates every array,
the workspace included; nothing here allocates or touches Python objects.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport qsort

cdef int64_t EMPTY_KEY = -1
cdef int32_t NO_RANK = 2147483647     # "no merge for this pair" from the encoder's lookup
cdef int64_t POSITION_MASK = 0xFFFFFFFF  # the low half of an encoder heap entry (rank << 32 | position)
cdef Py_ssize_t SHORT_WORD = 64         # longer words are merged through a heap, not by passes


cdef inline int64_t _pair_key(int32_t left, int32_t right) noexcept nogil:
    # ids are non-negative int32, so the key is unique and orders like (left, right)
    return (<int64_t>left << 32) | <int64_t>right


cdef inline uint64_t _mix(int64_t key) noexcept nogil:
    # splitmix64 finaliser: pair keys are highly regular, a plain modulus would cluster
    cdef uint64_t x = <uint64_t>key
    x ^= x >> 30
    x *= 0xbf58476d1ce4e5b9ULL
    x ^= x >> 27
    x *= 0x94d049bb133111ebULL
    x ^= x >> 31
    return x


cdef inline Py_ssize_t _probe(const int64_t* keys, uint64_t mask, int64_t key) noexcept nogil:
    """Index of `key` in the table, or of the empty cell where it would go."""
    cdef Py_ssize_t i = <Py_ssize_t>(_mix(key) & mask)
    while keys[i] != key and keys[i] != EMPTY_KEY:
        i = <Py_ssize_t>((<uint64_t>i + 1) & mask)
    return i


cdef int _cmp_int32(const void* a, const void* b) noexcept nogil:
    cdef int32_t x = (<const int32_t*>a)[0], y = (<const int32_t*>b)[0]
    return (x > y) - (x < y)


# --- training -------------------------------------------------------------------------------

cdef struct PairState:
    # symbols, linked per word; deleted positions hold -1
    int32_t* sym
    int32_t* prv
    int32_t* nxt
    int32_t* word
    const int64_t* counts
    # hash table: pair key -> pair slot
    int64_t* table_keys
    int32_t* table_slots
    uint64_t table_mask
    # pair slots
    int64_t* pair_count
    int64_t* pair_key
    int32_t* pair_head        # first position entry, -1 for none
    int32_t* pair_stamp       # last merge that raised this pair's count (dedups `touched`)
    Py_ssize_t n_pairs
    Py_ssize_t max_pairs
    # position entries (linked lists hanging off pair_head)
    int32_t* entry_pos
    int32_t* entry_next
    Py_ssize_t n_entries
    Py_ssize_t max_entries
    # max-heap of (count, slot)
    int64_t* heap_count
    int32_t* heap_slot
    Py_ssize_t heap_n
    Py_ssize_t heap_cap
    # slots whose count went up during the current merge
    int32_t* touched
    Py_ssize_t n_touched


cdef inline bint _heap_above(PairState* s, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    """Entry i ranks before entry j: higher count, then smaller pair key."""
    if s.heap_count[i] != s.heap_count[j]:
        return s.heap_count[i] > s.heap_count[j]
    return s.pair_key[s.heap_slot[i]] < s.pair_key[s.heap_slot[j]]


cdef inline void _heap_swap(PairState* s, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    cdef int64_t c = s.heap_count[i]
    cdef int32_t p = s.heap_slot[i]
    s.heap_count[i] = s.heap_count[j]
    s.heap_slot[i] = s.heap_slot[j]
    s.heap_count[j] = c
    s.heap_slot[j] = p


cdef inline int _heap_push(PairState* s, int64_t count, int32_t slot) noexcept nogil:
    cdef Py_ssize_t i = s.heap_n, parent
    if i >= s.heap_cap:
        return -1
    s.heap_count[i] = count
    s.heap_slot[i] = slot
    s.heap_n += 1
    while i > 0:
        parent = (i - 1) // 2
        if not _heap_above(s, i, parent):
            break
        _heap_swap(s, i, parent)
        i = parent
    return 0


cdef inline void _heap_pop(PairState* s) noexcept nogil:
    cdef Py_ssize_t i = 0, child, best
    s.heap_n -= 1
    s.heap_count[0] = s.heap_count[s.heap_n]
    s.heap_slot[0] = s.heap_slot[s.heap_n]
    while True:
        child = 2 * i + 1
        if child >= s.heap_n:
            break
        best = child
        if child + 1 < s.heap_n and _heap_above(s, child + 1, child):
            best = child + 1
        if not _heap_above(s, best, i):
            break
        _heap_swap(s, i, best)
        i = best


cdef inline int _add(PairState* s, int32_t left, int32_t right, int64_t delta,
                     int32_t position, int32_t stamp) noexcept nogil:
    """Add `delta` to the pair's count; record `position` (when >= 0) as a possible start."""
    cdef int64_t key = _pair_key(left, right)
    cdef Py_ssize_t cell = _probe(s.table_keys, s.table_mask, key)
    cdef int32_t slot, entry
    if s.table_keys[cell] == EMPTY_KEY:
        if s.n_pairs >= s.max_pairs:
            return -1
        slot = <int32_t>s.n_pairs
        s.n_pairs += 1
        s.table_keys[cell] = key
        s.table_slots[cell] = slot
        s.pair_count[slot] = 0
        s.pair_key[slot] = key
        s.pair_head[slot] = -1
        s.pair_stamp[slot] = -1
    else:
        slot = s.table_slots[cell]
    s.pair_count[slot] += delta
    if position >= 0:
        if s.n_entries >= s.max_entries:
            return -1
        entry = <int32_t>s.n_entries
        s.n_entries += 1
        s.entry_pos[entry] = position
        s.entry_next[entry] = s.pair_head[slot]
        s.pair_head[slot] = entry
    if delta > 0 and s.pair_stamp[slot] != stamp:
        s.pair_stamp[slot] = stamp
        s.touched[s.n_touched] = slot
        s.n_touched += 1
    return 0


cdef Py_ssize_t _train(PairState* s, int32_t* merges, int64_t* merge_counts, Py_ssize_t M,
                       const int64_t* offsets, Py_ssize_t W, Py_ssize_t N, int32_t* scratch,
                       int32_t n_base, int64_t min_count) noexcept nogil:
    """The merge loop of bpe_train: returns the number of merges learned, or -1 (workspace full)."""
    cdef Py_ssize_t k, i, j, n, done = 0
    cdef int32_t p, q, a, b, z, slot, e
    cdef int64_t best = 0, w, key
    cdef bint found
    for i in range(<Py_ssize_t>(s.table_mask + 1)):
        s.table_keys[i] = EMPTY_KEY
    # link the words and count every adjacent pair
    for k in range(W):
        for i in range(offsets[k], offsets[k + 1]):
            s.word[i] = <int32_t>k
            s.prv[i] = <int32_t>(i - 1) if i > offsets[k] else -1
            s.nxt[i] = <int32_t>(i + 1) if i + 1 < offsets[k + 1] else -1
            if i + 1 < offsets[k + 1]:
                if _add(s, s.sym[i], s.sym[i + 1], s.counts[k], <int32_t>i, -1) < 0:
                    return -1
    for slot in range(s.n_pairs):
        if _heap_push(s, s.pair_count[slot], slot) < 0:
            return -1

    while done < M:
        found = False
        while s.heap_n > 0:
            best = s.heap_count[0]
            slot = s.heap_slot[0]
            _heap_pop(s)
            if s.pair_count[slot] <= 0:
                continue
            if s.pair_count[slot] != best:     # stale: the count dropped since the push
                if _heap_push(s, s.pair_count[slot], slot) < 0:
                    return -1
                continue
            found = True
            break
        if not found or best < min_count:
            break
        key = s.pair_key[slot]
        a = <int32_t>(key >> 32)
        b = <int32_t>(key & 0xffffffffLL)
        z = <int32_t>(n_base + done)
        merges[2 * done] = a
        merges[2 * done + 1] = b
        merge_counts[done] = best

        # gather the candidate positions; their order matters only when a == b ("aaa" must
        # become "Za", not "aZ"), so only then are they sorted left to right
        n = 0
        e = s.pair_head[slot]
        while e != -1:
            if n >= N:
                return -1
            scratch[n] = s.entry_pos[e]
            n += 1
            e = s.entry_next[e]
        s.pair_head[slot] = -1
        if a == b:
            qsort(scratch, n, sizeof(int32_t), _cmp_int32)

        s.n_touched = 0
        for j in range(n):
            i = scratch[j]
            if s.sym[i] != a:
                continue                    # stale entry: this position merged into something else
            q = s.nxt[i]
            if q < 0 or s.sym[q] != b:
                continue
            w = s.counts[s.word[i]]
            p = s.prv[i]
            if p >= 0:
                if _add(s, s.sym[p], a, -w, -1, <int32_t>done) < 0:
                    return -1
                if _add(s, s.sym[p], z, w, p, <int32_t>done) < 0:
                    return -1
            if s.nxt[q] >= 0:
                if _add(s, b, s.sym[s.nxt[q]], -w, -1, <int32_t>done) < 0:
                    return -1
                if _add(s, z, s.sym[s.nxt[q]], w, <int32_t>i, <int32_t>done) < 0:
                    return -1
            # i becomes z; q leaves the list
            s.sym[i] = z
            s.sym[q] = -1
            s.nxt[i] = s.nxt[q]
            if s.nxt[q] >= 0:
                s.prv[s.nxt[q]] = <int32_t>i
        s.pair_count[slot] = 0
        for j in range(s.n_touched):
            if s.pair_count[s.touched[j]] > 0:
                if _heap_push(s, s.pair_count[s.touched[j]], s.touched[j]) < 0:
                    return -1
        done += 1
    return done


def bpe_train(int32_t[:, ::1] merges,            # (M, 2) out: merge r joins merges[r] into n_base + r
              int64_t[::1] merge_counts,         # (M,) out: weighted count of the pair when merged
              int32_t[::1] sym,                  # (N,) in: base ids; used as workspace (rewritten)
              const int64_t[::1] offsets,        # (W + 1,) word k is sym[offsets[k]:offsets[k + 1]]
              const int64_t[::1] counts,         # (W,) word frequencies, >= 1
              int32_t n_base,                    # ids below this are the base alphabet
              int64_t min_count,                 # stop when the best pair occurs fewer times
              int32_t[::1] prv,                  # (N,) workspace
              int32_t[::1] nxt,                  # (N,) workspace
              int32_t[::1] word,                 # (N,) workspace
              int32_t[::1] scratch,              # (N,) workspace: positions of the pair being merged
              int64_t[::1] table_keys,           # (C,) workspace, C a power of two >= 2 * P
              int32_t[::1] table_slots,          # (C,) workspace
              int64_t[::1] pair_count,           # (P,) workspace, P >= 3 * (N - W) + 1
              int64_t[::1] pair_key,             # (P,) workspace
              int32_t[::1] pair_head,            # (P,) workspace
              int32_t[::1] pair_stamp,           # (P,) workspace
              int32_t[::1] touched,              # (P,) workspace
              int32_t[::1] entry_pos,            # (P,) workspace
              int32_t[::1] entry_next,           # (P,) workspace
              int64_t[::1] heap_count,           # (P,) workspace
              int32_t[::1] heap_slot):           # (P,) workspace
    """Learn up to M merges. Returns how many were learned, or -1 if the workspace ran out."""
    cdef PairState s
    cdef Py_ssize_t W = counts.shape[0], N = sym.shape[0], M = merges.shape[0], done
    if N == 0 or M == 0:
        return 0
    s.sym = &sym[0]
    s.prv = &prv[0]
    s.nxt = &nxt[0]
    s.word = &word[0]
    s.counts = &counts[0]
    s.table_keys = &table_keys[0]
    s.table_slots = &table_slots[0]
    s.table_mask = <uint64_t>(table_keys.shape[0] - 1)
    s.pair_count = &pair_count[0]
    s.pair_key = &pair_key[0]
    s.pair_head = &pair_head[0]
    s.pair_stamp = &pair_stamp[0]
    s.n_pairs = 0
    s.max_pairs = pair_count.shape[0]
    s.entry_pos = &entry_pos[0]
    s.entry_next = &entry_next[0]
    s.n_entries = 0
    s.max_entries = entry_pos.shape[0]
    s.heap_count = &heap_count[0]
    s.heap_slot = &heap_slot[0]
    s.heap_n = 0
    s.heap_cap = heap_count.shape[0]
    s.touched = &touched[0]
    s.n_touched = 0
    with nogil:
        done = _train(&s, &merges[0, 0], &merge_counts[0], M, &offsets[0], W, N, &scratch[0],
                      n_base, min_count)
    return done


# --- encoding -------------------------------------------------------------------------------

def bpe_build_table(int64_t[::1] table_keys,        # (C,) out: pair keys, -1 = empty; C a power of two > M
                    int32_t[::1] table_ranks,       # (C,) out: merge rank of the key in the same cell
                    const int32_t[:, ::1] merges):  # (M, 2)
    """Fill the pair -> rank lookup the encoder uses. A repeated pair keeps its first rank."""
    cdef Py_ssize_t r, cell
    cdef uint64_t mask = <uint64_t>(table_keys.shape[0] - 1)
    cdef int64_t key
    with nogil:
        for cell in range(table_keys.shape[0]):
            table_keys[cell] = EMPTY_KEY
        for r in range(merges.shape[0]):
            key = _pair_key(merges[r, 0], merges[r, 1])
            cell = _probe(&table_keys[0], mask, key)
            if table_keys[cell] == EMPTY_KEY:
                table_keys[cell] = key
                table_ranks[cell] = <int32_t>r


cdef inline int32_t _rank(const int64_t* keys, const int32_t* ranks, uint64_t mask,
                          int32_t left, int32_t right) noexcept nogil:
    cdef Py_ssize_t cell = _probe(keys, mask, _pair_key(left, right))
    if keys[cell] == EMPTY_KEY:
        return NO_RANK
    return ranks[cell]


cdef inline Py_ssize_t _min_push(int64_t* h, Py_ssize_t n, int64_t v) noexcept nogil:
    """Push v onto the binary min-heap h[:n]; returns the new size."""
    cdef Py_ssize_t i = n, parent
    while i > 0:
        parent = (i - 1) >> 1
        if h[parent] <= v:
            break
        h[i] = h[parent]
        i = parent
    h[i] = v
    return n + 1


cdef inline Py_ssize_t _min_pop(int64_t* h, Py_ssize_t n) noexcept nogil:
    """Remove the smallest entry h[0] of the min-heap h[:n]; returns the new size."""
    cdef Py_ssize_t i = 0, child
    cdef int64_t v
    n -= 1
    v = h[n]
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and h[child + 1] < h[child]:
            child += 1
        if v <= h[child]:
            break
        h[i] = h[child]
        i = child
    h[i] = v
    return n


cdef inline Py_ssize_t _encode_by_passes(int32_t* s, Py_ssize_t n, int32_t* rk, int32_t* fresh,
                                         const int64_t* keys, const int32_t* ranks, uint64_t mask,
                                         int32_t n_base) noexcept nogil:
    """Merge the word s[:n] in place, one pass per merge applied (O(n) each); returns its new
    length. rk caches each adjacent pair's rank; only pairs next to a new symbol are looked up again."""
    cdef Py_ssize_t t, w
    cdef int32_t best, z
    for t in range(n - 1):
        rk[t] = _rank(keys, ranks, mask, s[t], s[t + 1])
    while n > 1:
        best = NO_RANK
        for t in range(n - 1):
            if rk[t] < best:
                best = rk[t]
        if best == NO_RANK:
            break
        z = n_base + best
        w = 0
        t = 0
        while t < n:
            if t + 1 < n and rk[t] == best:
                s[w] = z
                fresh[w] = 1
                t += 2
            else:
                # an unmerged symbol keeps its pair rank unless its right neighbour is new
                s[w] = s[t]
                fresh[w] = 0
                rk[w] = rk[t]
                t += 1
            w += 1
        n = w
        for t in range(n - 1):
            if fresh[t] or fresh[t + 1]:
                rk[t] = _rank(keys, ranks, mask, s[t], s[t + 1])
    return n


cdef inline Py_ssize_t _encode_by_heap(int32_t* s, Py_ssize_t n, int32_t* prv, int32_t* nxt, int64_t* heap,
                                       const int64_t* keys, const int32_t* ranks, uint64_t mask,
                                       int32_t n_base) noexcept nogil:
    """Merge the word s[:n] in place in O(n log n) however many merges apply; returns its new length.

    The symbols form a linked list over their first positions, and a min-heap holds every
    adjacent pair that has a merge, keyed rank << 32 | position. An entry whose pair changed
    since it was pushed is dropped when popped (its rank no longer matches). A merge pushes the
    at most two pairs it creates, whose ranks are above its own (a merge only joins earlier
    ids), so each rank is done whole, left to right, before the next: the passes' result.
    """
    cdef Py_ssize_t t, hn = 0, w = 0
    cdef int32_t r, p, q
    cdef int64_t top
    for t in range(n):
        prv[t] = <int32_t>(t - 1)
        nxt[t] = <int32_t>(t + 1) if t + 1 < n else -1
    for t in range(n - 1):
        r = _rank(keys, ranks, mask, s[t], s[t + 1])
        if r != NO_RANK:
            hn = _min_push(heap, hn, (<int64_t>r << 32) | t)
    while hn > 0:
        top = heap[0]
        hn = _min_pop(heap, hn)
        r = <int32_t>(top >> 32)
        p = <int32_t>(top & POSITION_MASK)
        q = nxt[p]
        if s[p] < 0 or q < 0 or _rank(keys, ranks, mask, s[p], s[q]) != r:
            continue  # stale: p was merged away, or its pair changed
        s[p] = n_base + r  # p keeps the merged symbol, q leaves the list
        s[q] = -1
        nxt[p] = nxt[q]
        if nxt[q] >= 0:
            prv[nxt[q]] = p
        if prv[p] >= 0:
            r = _rank(keys, ranks, mask, s[prv[p]], s[p])
            if r != NO_RANK:
                hn = _min_push(heap, hn, (<int64_t>r << 32) | prv[p])
        if nxt[p] >= 0:
            r = _rank(keys, ranks, mask, s[p], s[nxt[p]])
            if r != NO_RANK:
                hn = _min_push(heap, hn, (<int64_t>r << 32) | p)
    p = 0  # position 0 always survives (a merge keeps its left position); compact left to right
    while p >= 0:
        s[w] = s[p]
        w += 1
        p = nxt[p]
    return w


def bpe_encode(int32_t[::1] out,                    # (N,) out: token ids, words end to end
               int64_t[::1] out_offsets,            # (W + 1,) out: word k is out[out_offsets[k]:out_offsets[k + 1]]
               const int32_t[::1] sym,              # (N,) base ids, words end to end
               const int64_t[::1] offsets,          # (W + 1,)
               const int64_t[::1] table_keys,       # (C,) from bpe_build_table, C >= 2
               const int32_t[::1] table_ranks,      # (C,)
               int32_t n_base,
               int32_t[::1] scratch_a,              # (L,) L >= longest word: pair ranks, or left links
               int32_t[::1] scratch_b,              # (L,) new-symbol flags, or right links
               int64_t[::1] heap_scratch):          # (3 L,) the long-word encoder's pair heap
    """Apply the merges to each word: lowest rank first, each pair left to right, as in training.

    A word of up to SHORT_WORD symbols is merged by passes (_encode_by_passes: fastest for the
    short words text is made of); a longer one through a heap (_encode_by_heap), so a long word
    that many merges apply to (a chain a+b, ab+b, abb+b, ...) costs O(L log L), not O(L^2).
    """
    cdef Py_ssize_t W = offsets.shape[0] - 1, k, t, n, cursor = 0
    cdef uint64_t mask = <uint64_t>(table_keys.shape[0] - 1)
    cdef int32_t* s
    cdef const int64_t* keys = &table_keys[0]
    cdef const int32_t* ranks = &table_ranks[0]
    cdef int32_t* a = &scratch_a[0]
    cdef int32_t* b = &scratch_b[0]
    cdef int64_t* heap = &heap_scratch[0]
    with nogil:
        out_offsets[0] = 0
        for k in range(W):
            n = offsets[k + 1] - offsets[k]
            # cursor <= offsets[k] (words only shrink), so the word fits where it is written
            s = &out[cursor]
            for t in range(n):
                s[t] = sym[offsets[k] + t]
            if n <= SHORT_WORD:
                n = _encode_by_passes(s, n, a, b, keys, ranks, mask, n_base)
            else:
                n = _encode_by_heap(s, n, a, b, heap, keys, ranks, mask, n_base)
            cursor += n
            out_offsets[k + 1] = cursor
