"""FinetuneDataset: records -> {"input_ids", "labels"} examples, tokenized once, up front.

    FinetuneDataset("chat.jsonl", tokenizer, max_length=512)
    FinetuneDataset(records, tokenizer, field_map={"instruction": "question", "output": "answer"})

Records are Alpaca, chat ("messages"), ShareGPT ("conversations") or plain text, from a list,
.json, .jsonl or .parquet (fastlora/data/formats.py and sources.py); they are encoded as
fastlora/data/examples.py says: an Alpaca record's prompt is masked and its output + [eos]
scored, a conversation's assistant turns are scored, a text record is scored throughout.
Labels have the same length as input_ids; the loss shifts them (docs/DESIGN.md).

An example longer than max_length is cut, never silently lost (truncation.py): by default the
response keeps up to half the budget and the prompt the rest, cut from its start;
truncation="drop" cuts at the end and drops, with one warning, a record whose prompt alone
fills max_length.

Large files stream: records are read, encoded and truncated a chunk at a time (a progress bar
shows for big files), and only the kept tokens stay, as one flat int32 array of ids and one
of scored flags. Records of a .jsonl or .parquet file are read back from the file when asked
for (`records[i]`), not kept. A text field longer than a window of characters (far more than
max_length tokens need) is tokenized clipped to the part that can be kept, and the window is
widened until the kept tokens no longer change, so the result equals tokenizing it whole;
one 100 MB line costs a few times its size, not the tokens of all of it.

packing=True places whole examples into rows of max_length tokens (fastlora/data/packing.py):
an item is then a row, with "position_ids" restarting at 0 at each example, which the models
read to keep attention within each example; `lengths` are the rows', `example_lengths` the
examples'. The loss is that of the unpacked dataset.

add_eos=False leaves the [eos] off Alpaca and text records: for scoring an answer in text
that goes on after it (the demo scores the bundled tasks asked in the base model's own prose
that way).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Iterable, Optional, Union

import numpy as np

from fastlora._typing import PathLike, Record
from fastlora.data.examples import ExampleEncoder
from fastlora.data.formats import ALPACA, TEXT, RecordReader, record_kind
from fastlora.data.formatter import InstructionFormatter
from fastlora.data.packing import best_fit_decreasing
from fastlora.data.sources import LazyRecords, open_source
from fastlora.data.tokenizer import check_tokenizer
from fastlora.data.truncation import check_mode, response_starts, truncate

IGNORE_INDEX = -100
CHUNK = 1000  # records read and encoded together
WINDOW = 1 << 16  # characters of a field tokenized at first when it is longer
_FIRST = object()  # _fit_long's "no earlier window"


class FinetuneDataset:
    """A list-like dataset of {"input_ids": [...], "labels": [...]} items."""

    def __init__(self, data: Union[PathLike, Iterable[Record]], tokenizer: Any, max_length: int = 128,
                 formatter: Any = None, train_on_inputs: bool = False, add_eos: bool = True,
                 truncation: str = "keep_response", field_map: Optional[Dict[str, str]] = None,
                 progress: Optional[bool] = None, packing: bool = False) -> None:
        self.tokenizer = check_tokenizer(tokenizer)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (a prompt token and a response "
                             f"token), got {max_length!r}")
        self.max_length = max_length
        self.formatter = InstructionFormatter() if formatter is None else formatter
        self.train_on_inputs = bool(train_on_inputs)
        self.add_eos = bool(add_eos)
        self.truncation = check_mode(truncation)
        where = os.fspath(data) if isinstance(data, (str, os.PathLike)) else "data"
        source = open_source(data, RecordReader(field_map))
        self._encoder = ExampleEncoder(self.tokenizer, self.formatter, self.add_eos)
        self._window = max(WINDOW, 256 * max_length)

        # kept tokens are stored a chunk at a time (no final concatenation doubling the peak)
        ids_chunks, scored_chunks, starts, lengths, cuts = [], [], [], [], []
        locators, skipped, cut_indices, total = [], [], [], 0
        with _progress_bar(source, where, progress) as bar:
            for chunk in source.chunks(CHUNK, bar):
                total += len(chunk)
                ids, scored, offsets, kept, cut = self._chunk(chunk)
                cut_indices += cut
                kept_set = set(kept)
                skipped += [chunk[k][0] for k in range(len(chunk)) if k not in kept_set]
                if not kept:
                    continue
                ids_chunks.append(ids)
                scored_chunks.append(scored)
                starts.append(offsets[:-1])
                lengths.append(np.diff(offsets))
                cuts.append(response_starts(scored, offsets))
                locators += [chunk[k][3] for k in kept]
        if total == 0:
            raise ValueError(f"{where}: empty dataset (no records)")
        if not ids_chunks:
            raise ValueError(f"{where}: all {total} records were dropped: each prompt is at least "
                             f"max_length={max_length} tokens, leaving no response token to train "
                             f"on; raise max_length or use truncation='keep_response'")
        if skipped:
            warnings.warn(f"FinetuneDataset: dropped {len(skipped)} of {total} records "
                          f"from {where} whose prompt alone fills max_length={max_length} "
                          f"tokens (record indices {skipped[:10]}"
                          f"{' ...' if len(skipped) > 10 else ''}); raise max_length to keep "
                          f"them", stacklevel=2)
        self._ids, self._scored = ids_chunks, scored_chunks  # int32 ids and bool flags, per chunk
        self._chunk_first = np.concatenate([[0], np.cumsum([len(x) for x in starts])])[:-1].astype(np.int64)
        self._starts = np.concatenate(starts)  # each example's first token within its chunk
        self.example_lengths = np.concatenate(lengths)
        self.prompt_lengths = np.concatenate(cuts)  # where each example's response starts
        self.packing = bool(packing)
        if self.packing:
            if self.truncation == "drop" and (cut_indices or skipped):
                first = min(cut_indices + skipped)
                raise ValueError(f"{where}: record {first} is longer than max_length={max_length} tokens, and "
                                 f"packing with truncation='drop' never cuts a record: raise max_length "
                                 f"or use truncation='keep_response'")
            # rows of whole examples (fastlora/data/packing.py); an item is then a row
            self._rows, self._members = best_fit_decreasing(self.example_lengths, max_length)
            self.lengths = np.add.reduceat(self.example_lengths[self._members], self._rows[:-1])
        else:
            self.lengths = self.example_lengths
        self.records = (LazyRecords(source, np.array(locators, dtype=np.int64)) if source.lazy
                        else locators)
        self.skipped = len(skipped)
        self.skipped_indices = skipped
        self.truncated = len(cut_indices)

    # --- building ----------------------------------------------------------------------------

    def _chunk(self, chunk):
        """Encode and fit a chunk of (index, at, record, locator) -> (ids, scored, offsets of the
        kept examples, positions in the chunk of the kept ones, record indices of those cut)."""
        short = [k for k, (_, _, record, _) in enumerate(chunk) if _longest(record) <= self._window]
        ids, scored, offsets = self._encoder.encode([chunk[k][2] for k in short], [chunk[k][1] for k in short])
        if len(short) == len(chunk) and (np.diff(offsets) <= self.max_length).all():
            return ids, scored, offsets, list(range(len(chunk))), []  # nothing to cut: the common case
        fitted = [None] * len(chunk)
        for j, k in enumerate(short):
            fitted[k] = self._fit((ids[offsets[j]:offsets[j + 1]], scored[offsets[j]:offsets[j + 1]]))
        for k in set(range(len(chunk))) - set(short):
            fitted[k] = self._fit_long(chunk[k][2], chunk[k][1])
        kept = [k for k in range(len(chunk)) if fitted[k][0] is not None]
        examples = [fitted[k][0] for k in kept]
        cut = [chunk[k][0] for k in kept if fitted[k][1]]
        if not examples:
            return None, None, None, [], cut
        sizes = np.array([len(e[0]) for e in examples], dtype=np.int64)
        return (np.concatenate([e[0] for e in examples]), np.concatenate([e[1] for e in examples]),
                np.concatenate([[0], np.cumsum(sizes)]), kept, cut)

    def _fit(self, example):
        """-> ((ids, scored) fitted to max_length, or None if dropped; 1 if it was cut, else 0)."""
        fitted = truncate(*example, self.max_length, self.truncation)
        return fitted, int(fitted is not None and len(fitted[0]) < len(example[0]))

    def _encode_one(self, record, at):
        ids, scored, _ = self._encoder.encode([record], [at])
        return ids, scored

    def _fit_long(self, record, at):
        """_fit of a record with a huge field: tokenize the fields clipped to a window of
        characters around the part that can be kept, widening it until the result is stable."""
        window, longest, previous = self._window, _longest(record), _FIRST
        while window < longest:
            fitted, _ = self._fit(self._encode_one(_clip(record, window, self.truncation), at))
            if previous is not _FIRST and _same(fitted, previous):
                return fitted, int(fitted is not None)
            previous, window = fitted, window * 4
        return self._fit(self._encode_one(record, at))

    # --- reading -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset indices must be ints, got {type(index).__name__}")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} examples")
        index = int(index) % n
        if not self.packing:
            ids, labels = self._example(index)
            return {"input_ids": ids.tolist(), "labels": labels.tolist()}
        parts = [self._example(int(e)) for e in self._members[self._rows[index]:self._rows[index + 1]]]
        for _, labels in parts:
            labels[0] = IGNORE_INDEX  # predicted from the record before it: never a target
        return {"input_ids": np.concatenate([p[0] for p in parts]).tolist(),
                "labels": np.concatenate([p[1] for p in parts]).tolist(),
                "position_ids": np.concatenate([np.arange(len(p[0])) for p in parts]).tolist()}

    def _example(self, index):
        """(ids, labels) int64 arrays of example `index`."""
        c = int(np.searchsorted(self._chunk_first, index, side="right")) - 1
        span = slice(self._starts[index], self._starts[index] + self.example_lengths[index])
        ids = self._ids[c][span].astype(np.int64)
        labels = ids.copy()
        if not self.train_on_inputs:
            labels[~self._scored[c][span]] = IGNORE_INDEX
        return ids, labels

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def prompt_and_reference(self, index):
        """(prompt ids, reference answer, stop strings) to ask the model record `index`'s answer
        (a conversation's last assistant turn), or None for a text record."""
        return self._encoder.prompt_and_reference(self.records[index])

    def __repr__(self):
        items = (f"{len(self)} rows packing {len(self.example_lengths)} examples" if self.packing
                 else f"{len(self)} examples")
        return (f"FinetuneDataset({items}, max_length={self.max_length}, "
                f"truncation={self.truncation!r}, truncated={self.truncated}, skipped={self.skipped}, "
                f"tokens={int(self.lengths.sum())})")


def _strings(record):
    kind = record_kind(record)
    if kind == ALPACA:
        return [record["instruction"], record["input"], record["output"]]
    if kind == TEXT:
        return [record["text"]]
    return [m["content"] for m in record["messages"]]


def _longest(record):
    return max(map(len, _strings(record)))


def _clip(record, window, truncation):
    """`record` with each field cut to `window` characters: the response's start, the rest's end
    (under "drop", every field's start), which is what truncation can keep of it."""
    def head(s):
        return s[:window]

    def tail(s):
        return s[-window:] if truncation == "keep_response" else s[:window]

    kind = record_kind(record)
    if kind == ALPACA:
        return {"instruction": tail(record["instruction"]), "input": tail(record["input"]),
                "output": head(record["output"])}
    if kind == TEXT:
        return {"text": head(record["text"])}
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"messages": [dict(m, content=(head if i >= last else tail)(m["content"]))
                         for i, m in enumerate(messages)]}


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


class _NoBar:
    def update(self, n):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress_bar(source, where, progress):
    """A tqdm bar over the source's bytes or records: always with progress=True, never with
    False, and with None for a big source (16 MiB, or 100k records) on a terminal."""
    big = source.size >= (16 << 20 if source.unit == "B" else 100_000)
    if progress is False or (progress is None and not big):
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=source.size, unit=source.unit, unit_scale=source.unit == "B",
                desc=f"tokenizing {os.path.basename(where)}", disable=None if progress is None else False)

