"""DataLoader: batches from a dataset in an order fixed by (seed, epoch).

The order of epoch e depends only on (seed, e, len(dataset)), never on how many epochs ran
before or on global RNG state, so a resumed run reproduces it exactly:

    loader.set_epoch(e)                       # then iterate, as PyTorch's samplers do
    loader.iter_epoch(e, start_batch=k)       # or jump into the middle of an epoch

Iterating without set_epoch walks epochs 0, 1, 2, ... in turn (loader.epoch is the one the
next `for` loop gets), so a plain training loop still reshuffles every epoch.

group_by_length=True cuts padding the way Hugging Face's LengthGroupedSampler does: the
shuffled order is cut into mega-batches of 50 batches, each is sorted by length, split into
batches, and the batches are shuffled, so each batch holds similar lengths while the epoch
stays random.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np

from fastlora.data.collator import DataCollator

MEGABATCH = 50  # batches per length-sorted group; bigger groups pad less but vary less


class DataLoader:
    """Iterable of collated batches (dicts of (B, T) int64 arrays); len() is batches per epoch."""

    def __init__(self, dataset: Any, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 collator: Optional[Callable[[list], Dict[str, np.ndarray]]] = None,
                 group_by_length: bool = False) -> None:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(f"dataset must support len() and indexing, got "
                            f"{type(dataset).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        n = len(dataset)
        if n == 0:
            raise ValueError("dataset is empty")
        if drop_last and n < batch_size:
            raise ValueError(f"drop_last=True with batch_size={batch_size} and only {n} "
                             f"examples gives no batch at all")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.group_by_length = bool(group_by_length)
        if collator is None:
            tokenizer = getattr(dataset, "tokenizer", None)
            collator = DataCollator(pad_token_id=getattr(tokenizer, "pad_token_id", 0))
        if not callable(collator) and not hasattr(collator, "collate"):
            raise TypeError("collator must be a DataCollator or a callable batch -> dict")
        self.collator = collator
        self.epoch = 0
        self._lengths = None

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch):
        """Make the next iteration produce epoch `epoch`'s order."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        epoch = self.epoch
        self.epoch += 1
        return self.iter_epoch(epoch)

    def iter_epoch(self, epoch, start_batch=0):
        """Batches of epoch `epoch` from batch index `start_batch` on (for resuming mid-epoch)."""
        plan = self.batch_indices(epoch)
        if isinstance(start_batch, bool) or not isinstance(start_batch, (int, np.integer)) \
                or not 0 <= start_batch <= len(plan):
            raise ValueError(f"start_batch must be an int in [0, {len(plan)}], got {start_batch!r}")
        collate = self.collator.collate if hasattr(self.collator, "collate") else self.collator
        return (collate([self.dataset[int(i)] for i in idx]) for idx in plan[start_batch:])

    def batch_indices(self, epoch):
        """The dataset indices of every batch of epoch `epoch`: a list of int64 arrays."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        n, bs = len(self.dataset), self.batch_size
        # one generator per (seed, epoch): the order never depends on earlier epochs
        rng = np.random.default_rng([self.seed, int(epoch)])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.group_by_length:
            lengths = self._example_lengths()
            mega = bs * MEGABATCH
            order = np.concatenate([
                chunk[np.argsort(-lengths[chunk], kind="stable")]
                for chunk in (order[i:i + mega] for i in range(0, n, mega))])
        batches = [order[i:i + bs] for i in range(0, n, bs)]
        if self.drop_last and len(batches[-1]) < bs:
            batches.pop()
        if self.group_by_length and self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _example_lengths(self):
        if self._lengths is None:
            lengths = getattr(self.dataset, "lengths", None)
            if lengths is None or len(lengths) != len(self.dataset):
                lengths = [len(self.dataset[i]["input_ids"]) for i in range(len(self.dataset))]
            self._lengths = np.asarray(lengths, dtype=np.int64)
        return self._lengths

    def __repr__(self):
        return (f"DataLoader({len(self.dataset)} examples, batch_size={self.batch_size}, "
                f"{len(self)} batches/epoch, shuffle={self.shuffle}, seed={self.seed}, "
                f"group_by_length={self.group_by_length})")
