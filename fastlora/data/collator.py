"""DataCollator: pad a list of examples into int64 arrays of one length (right padding).

Output of collate(batch), B examples padded to length T:
    input_ids       (B, T) int64, padded with pad_token_id
    labels          (B, T) int64, padded with -100 so padding is never scored
    attention_mask  (B, T) int64, 1 on real tokens, 0 on padding
    position_ids    (B, T) int64, padded with 0, when the examples have them (packed rows:
                    positions restart at each record; a pad is then a record of its own)

Padding goes on the right: with causal attention a real token never attends to a later pad,
so the model needs no mask for training. T is the longest example by default, max_length
when given, and is rounded up to pad_to_multiple_of when given.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

IGNORE_INDEX = -100


def _positive_int(name, value, allow_none=True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return int(value)


class DataCollator:
    """Callable: collator(batch) is collator.collate(batch)."""

    def __init__(self, pad_token_id: int = 0, max_length: Optional[int] = None,
                 pad_to_multiple_of: Optional[int] = None, label_pad_id: int = IGNORE_INDEX) -> None:
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, (int, np.integer)) \
                or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be an int >= 0, got {pad_token_id!r}")
        self.pad_token_id = int(pad_token_id)
        self.max_length = _positive_int("max_length", max_length)
        self.pad_to_multiple_of = _positive_int("pad_to_multiple_of", pad_to_multiple_of)
        if self.max_length and self.pad_to_multiple_of and self.max_length % self.pad_to_multiple_of:
            raise ValueError(f"max_length={max_length} is not a multiple of "
                             f"pad_to_multiple_of={pad_to_multiple_of}")
        self.label_pad_id = int(label_pad_id)

    def collate(self, batch):
        """list of {"input_ids": [...], "labels": [...]} -> dict of (B, T) int64 arrays."""
        if isinstance(batch, dict) or not hasattr(batch, "__len__") or len(batch) == 0:
            raise ValueError("collate() takes a non-empty list of examples (dicts with "
                             "'input_ids' and 'labels')")
        rows, present = [], None
        optional = {"labels": self.label_pad_id, "position_ids": 0}  # field -> its padding
        extra = {field: [] for field in optional}
        for i, item in enumerate(batch):
            if not isinstance(item, dict) or "input_ids" not in item:
                raise ValueError(f"batch[{i}] must be a dict with 'input_ids', got "
                                 f"{type(item).__name__}")
            fields = [f for f in optional if f in item]
            if present is None:
                present = fields
            elif fields != present:
                field = next(f for f in optional if (f in fields) != (f in present))
                raise ValueError(f"batch[{i}] {'lacks' if field in present else 'has'} {field!r} "
                                 f"unlike batch[0]; give {field} for all examples or none")
            ids = self._row(item["input_ids"], i, "input_ids")
            if len(ids) == 0:
                raise ValueError(f"batch[{i}]['input_ids'] is empty")
            if ids.min() < 0:
                raise ValueError(f"batch[{i}]['input_ids'] holds a negative id {int(ids.min())}")
            if self.max_length is not None and len(ids) > self.max_length:
                raise ValueError(f"batch[{i}] has {len(ids)} tokens, more than max_length="
                                 f"{self.max_length}; truncate in the dataset (max_length=...)")
            rows.append(ids)
            for field in present:
                row = self._row(item[field], i, field)
                if len(row) != len(ids):
                    raise ValueError(f"batch[{i}] has {len(ids)} input_ids but {len(row)} "
                                     f"{field}; they must have the same length")
                extra[field].append(row)

        T = self.max_length or max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(rows)
        input_ids = np.full((B, T), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((B, T), dtype=np.int64)
        for b, ids in enumerate(rows):
            input_ids[b, :len(ids)] = ids
            attention_mask[b, :len(ids)] = 1
        out = {"input_ids": input_ids}
        for field in present:
            padded = np.full((B, T), optional[field], dtype=np.int64)
            for b, row in enumerate(extra[field]):
                padded[b, :len(row)] = row
            out[field] = padded
        out["attention_mask"] = attention_mask
        return out

    __call__ = collate

    @staticmethod
    def _row(values, i, field):
        arr = np.asarray(values)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if arr.dtype.kind not in "iu" or arr.ndim != 1:
            raise ValueError(f"batch[{i}]['{field}'] must be a 1-D list of ints, got dtype "
                             f"{arr.dtype} shape {arr.shape}")
        return arr.astype(np.int64, copy=False)

    def __repr__(self):
        return (f"DataCollator(pad_token_id={self.pad_token_id}, max_length={self.max_length}, "
                f"pad_to_multiple_of={self.pad_to_multiple_of})")
