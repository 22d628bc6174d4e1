"""The parts of data-parallel training that need no MPI (fastlora.train.distributed uses them).

    ShardedLoader        this rank's part of every global batch a DataLoader makes
    GradBuckets          the gradients as views of flat per-dtype buffers, cut into buckets to reduce
    derived_rng_state    a generator state seeded from another state and a label (per-rank dropout)
"""
import hashlib
import json

import numpy as np

from fastlora.errors import FastloraError

# a bucket bounds the scratch memory an MPI library takes for one in-place reduction
BUCKET_BYTES = 16 << 20


# --- the data ------------------------------------------------------------------------------------------

class ShardedLoader:
    """A DataLoader's global batches, only this rank's part of each: the `rank`-th of `size` contiguous,
    disjoint slices of the batch's indices (np.array_split; a final short batch may leave a rank
    an empty part, which trains on nothing that step)."""

    def __init__(self, loader, rank, size):
        if loader.batch_size % size:
            raise FastloraError(f"batch_size {loader.batch_size} does not split over {size} ranks: the global batch "
                                f"must be a multiple of the number of ranks (e.g. {size * -(-loader.batch_size // size)})")
        self.loader, self.rank, self.size = loader, rank, size
        self.batch_size = loader.batch_size

    def __len__(self):
        return len(self.loader)

    def batch_indices(self, epoch):
        """This rank's part of every global batch of epoch `epoch`."""
        return [np.array_split(idx, self.size)[self.rank] for idx in self.loader.batch_indices(epoch)]

    def iter_epoch(self, epoch, start_batch=0):
        plan = self.batch_indices(epoch)
        if isinstance(start_batch, bool) or not isinstance(start_batch, (int, np.integer)) \
                or not 0 <= start_batch <= len(plan):
            raise ValueError(f"start_batch must be an int in [0, {len(plan)}], got {start_batch!r}")
        collator = self.loader.collator
        collate = collator.collate if hasattr(collator, "collate") else collator
        dataset = self.loader.dataset
        return (collate([dataset[int(i)] for i in idx]) if len(idx) else _empty_batch() for idx in plan[start_batch:])


def _empty_batch():
    """A batch of no rows: no scored token, so the Trainer runs nothing on it."""
    return {"input_ids": np.zeros((0, 1), np.int64), "labels": np.full((0, 1), -100, np.int64),
            "attention_mask": np.zeros((0, 1), np.int64)}


# --- the gradients ---------------------------------------------------------------------------------------

class GradBuckets:
    """The gradients of `params` as views of one flat, contiguous buffer per dtype, reduced a bucket (a
    BUCKET_BYTES slice of a buffer) at a time.

    A parameter that has had a gradient gets its view as .grad before the backward, which then
    accumulates into it in place (+=); one the backward has not reached yet (on the first step) has
    its new gradient copied in. A parameter no rank produced a gradient for keeps .grad None, as it
    would in one process (AdamW then leaves it and its step count alone).
    """

    def __init__(self, params, bucket_bytes=BUCKET_BYTES):
        seen, self.params = set(), []
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        self.views = [None] * len(self.params)
        self.flats, self.buckets = [], []
        for dtype in dict.fromkeys(p.data.dtype for p in self.params):
            members = [i for i, p in enumerate(self.params) if p.data.dtype == dtype]
            flat = np.zeros(sum(self.params[i].data.size for i in members), dtype=dtype)
            offset = 0
            for i in members:
                shape, size = self.params[i].data.shape, self.params[i].data.size
                self.views[i] = flat[offset:offset + size].reshape(shape)
                offset += size
            step = max(1, bucket_bytes // dtype.itemsize)
            self.flats.append(flat)
            self.buckets += [flat[s:s + step] for s in range(0, flat.size, step)]
        self.used = np.zeros(len(self.params), dtype=bool)

    def holds(self, params):
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))

    def attach(self):
        for flat in self.flats:
            flat.fill(0)
        for i in np.flatnonzero(self.used):
            self.params[i].grad = self.views[i]

    def gather(self):
        """Flags (1.0 where this rank has a gradient), with every gradient in its view."""
        flags = np.zeros(len(self.params))
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            flags[i] = 1.0
            if p.grad is not self.views[i]:
                self.views[i][...] = p.grad
        return flags

    def scatter(self, flags):
        for i, p in enumerate(self.params):
            self.used[i] = flags[i] > 0
            p.grad = self.views[i] if self.used[i] else None


def derived_rng_state(rng, state, label):
    """A state for `rng`'s kind of bit generator, seeded from `state` (another state of it) and `label`."""
    digest = hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode() + b"|" + label.encode())
    return type(rng.bit_generator)(np.random.SeedSequence(int.from_bytes(digest.digest(), "little"))).state
