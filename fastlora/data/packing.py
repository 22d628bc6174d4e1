"""Packing: several examples in one row of at most max_length tokens, so short records stop padding
most of every batch.

Rows are filled best-fit decreasing (TRL's default "bfd" strategy): examples longest first,
each into the row whose room left is the smallest that still holds it, else into a new row.
No example is ever split. The model keeps them apart: each row carries position_ids that count
0, 1, ... from every example's first token, from which the attention takes each token's record
start (fastlora._runtime.attention.segment_starts), and the label of every example's first token is
-100 (it is predicted from nothing of its own: unpacked, the shift leaves it out the same way),
so a packed dataset gives the loss of the unpacked one.
"""
from __future__ import annotations

import numpy as np


def best_fit_decreasing(lengths, capacity):
    """-> (rows (R + 1,) offsets into members, members: example indices row by row)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"every example must have 1 to {capacity} tokens to be packed")
    by_room = [[] for _ in range(capacity + 1)]  # room left -> rows with that much room
    open_rooms = np.zeros(capacity + 1, dtype=bool)
    rows = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        fits = np.flatnonzero(open_rooms[n:])
        if fits.size:
            room = n + int(fits[0])
            r = by_room[room].pop()
            open_rooms[room] = bool(by_room[room])
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room > n:
            by_room[room - n].append(r)
            open_rooms[room - n] = True
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows], dtype=np.int64)])
    members = np.array([i for r in rows for i in r], dtype=np.int64)
    return offsets.astype(np.int64), members
