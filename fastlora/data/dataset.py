"""FinetuneDataset: instruction records -> token ids and labels, tokenized once, up front.

For each record the prompt (instruction, input and the response header) and the response
are encoded separately and joined:

    input_ids = encode(prompt) + encode(output) + [eos]
    labels    = [-100] * len(encode(prompt)) + encode(output) + [eos]

Encoding the two parts separately puts the mask boundary exactly where the response starts,
whatever the tokenizer does at that seam, and matches generation, which feeds
encode(prompt) and lets the model continue. Labels have the same length as input_ids; the
loss shifts them (the Hugging Face convention, DESIGN.md).

add_eos=False leaves the [eos] off both: for scoring an answer in text that goes on after it
(the demo scores the bundled tasks asked in the base model's own prose that way).

Sequences longer than max_length are cut at the end. A record whose prompt alone fills
max_length would have nothing left to train on: it is dropped, counted in `skipped` and
reported once with a warning, never kept as an all -100 example.
"""
import os
import warnings
from itertools import chain

import numpy as np

from fastlora.data.formatter import InstructionFormatter
from fastlora.data.hf_tokenizer import HFTokenizer
from fastlora.data.records import load_records
from fastlora.data.tokenizer import Tokenizer, check_tokenizer

IGNORE_INDEX = -100


class FinetuneDataset:
    """A list-like dataset of {"input_ids": [...], "labels": [...]} items."""

    def __init__(self, data, tokenizer, max_length=128, formatter=None, train_on_inputs=False, add_eos=True):
        self.tokenizer = check_tokenizer(tokenizer)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (a prompt token and a response "
                             f"token), got {max_length!r}")
        self.max_length = max_length
        self.formatter = InstructionFormatter() if formatter is None else formatter
        self.train_on_inputs = bool(train_on_inputs)
        where = os.fspath(data) if isinstance(data, (str, os.PathLike)) else "data"
        records = load_records(data)

        prompt_lists, output_lists = self._tokenize(records, where)

        self.add_eos = bool(add_eos)
        end = [int(tokenizer.eos_token_id)] if self.add_eos else []
        kept, kept_index, ids_parts, prompt_lens, skipped = [], [], [], [], []
        for i, record in enumerate(records):
            prompt_ids, response_ids = prompt_lists[i], output_lists[i]
            if not response_ids and not end:
                raise ValueError(f"{where}: record {i}: the output encodes to no tokens and "
                                 f"add_eos=False, so it has nothing to score")
            if len(prompt_ids) >= max_length:
                skipped.append(i)
                continue
            kept.append(record)
            kept_index.append(i)
            ids_parts.append((prompt_ids + response_ids + end)[:max_length])
            prompt_lens.append(len(prompt_ids))
        if not kept:
            raise ValueError(f"{where}: all {len(records)} records were dropped: each prompt "
                             f"is at least max_length={max_length} tokens, leaving no response "
                             f"token to train on; raise max_length")

        lengths = np.array([len(ids) for ids in ids_parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        # one flat array rather than N small lists: compact, and checked in one pass
        ids = np.fromiter(chain.from_iterable(ids_parts), dtype=np.int64, count=int(offsets[-1]))
        bad = (ids < 0) | (ids >= int(tokenizer.vocab_size))
        if bad.any():
            k = int(np.searchsorted(offsets, np.argmax(bad), side="right")) - 1
            raise ValueError(f"{where}: record {kept_index[k]}: the tokenizer returned id "
                             f"{int(ids[np.argmax(bad)])} outside [0, vocab_size = "
                             f"{tokenizer.vocab_size})")
        if skipped:
            warnings.warn(f"FinetuneDataset: dropped {len(skipped)} of {len(records)} records "
                          f"from {where} whose prompt alone fills max_length={max_length} "
                          f"tokens (record indices {skipped[:10]}"
                          f"{' ...' if len(skipped) > 10 else ''}); raise max_length to keep "
                          f"them", stacklevel=2)
        self.records = kept
        self.skipped = len(skipped)
        self.skipped_indices = skipped
        self.lengths = lengths
        self.prompt_lengths = np.array(prompt_lens, dtype=np.int64)
        self._offsets = offsets
        self._ids = ids

    def _tokenize(self, records, where):
        """-> (prompt ids, output ids): one list of ints per record for each."""
        prompts = []
        for i, record in enumerate(records):
            try:
                # format() refuses fields that hold a section header: trained on, they teach
                # the model a template it cannot tell apart from the real one
                self.formatter.format(record["instruction"], record["input"], record["output"])
            except ValueError as exc:
                raise ValueError(f"{where}: record {i}: {exc}") from None
            prompts.append(self.formatter.prompt(record["instruction"], record["input"]))
        outputs = [record["output"] for record in records]
        tokenizer = self.tokenizer
        if isinstance(tokenizer, (Tokenizer, HFTokenizer)):
            # ours encode a batch with one kernel call (per text, the call overhead dominates),
            # a Hugging Face one in parallel in Rust; both return lists of ints, which
            # __init__ range-checks all at once
            return tokenizer.encode_batch(prompts), tokenizer.encode_batch(outputs)
        return ([self._check_ids(tokenizer.encode(text), where, i, "instruction/input")
                 for i, text in enumerate(prompts)],
                [self._check_ids(tokenizer.encode(text), where, i, "output")
                 for i, text in enumerate(outputs)])

    def _check_ids(self, ids, where, index, field):
        """A foreign tokenizer's output for one field as a list of ints in [0, vocab_size)."""
        ids = np.asarray(list(ids))
        if ids.size == 0:
            return []
        vocab = int(self.tokenizer.vocab_size)
        if ids.dtype.kind not in "iu" or ids.ndim != 1:
            raise ValueError(f"{where}: record {index}: tokenizer.encode({field}) must return a "
                             f"list of ints, got dtype {ids.dtype} shape {ids.shape}")
        bad = (ids < 0) | (ids >= vocab)
        if bad.any():
            raise ValueError(f"{where}: record {index}: tokenizer.encode({field}) returned id "
                             f"{int(ids[np.argmax(bad)])} outside [0, vocab_size = {vocab})")
        return ids.tolist()

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, index):
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset indices must be ints, got {type(index).__name__}")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} examples")
        index = int(index) % n
        ids = self._ids[self._offsets[index]:self._offsets[index + 1]]
        labels = ids.copy()
        if not self.train_on_inputs:
            labels[:self.prompt_lengths[index]] = IGNORE_INDEX
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self):
        return (f"FinetuneDataset({len(self)} examples, max_length={self.max_length}, "
                f"skipped={self.skipped}, tokens={int(self.lengths.sum())})")
