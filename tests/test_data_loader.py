"""DataCollator padding, DataLoader order per (seed, epoch), length grouping, train_test_split."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlora.data import DataCollator, DataLoader, train_test_split


def _item(n, prompt=1, start=10):
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}


class Items:
    """A bare dataset: a list of items, nothing else (no tokenizer, no lengths)."""

    def __init__(self, lengths):
        self.items = [_item(n, start=i) for i, n in enumerate(lengths)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


# --- DataCollator -------------------------------------------------------------------------

def test_collate_pads_to_the_longest_with_pad_and_minus_100():
    batch = DataCollator(pad_token_id=7).collate([_item(3), _item(5, prompt=2)])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    for key in batch:
        assert batch[key].dtype == np.int64 and batch[key].shape == (2, 5)
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 7, 7]
    assert batch["labels"][0].tolist() == [-100, 11, 12, -100, -100]
    assert batch["labels"][1].tolist() == [-100, -100, 12, 13, 14]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_collate_to_max_length_or_a_multiple():
    assert DataCollator(max_length=8).collate([_item(3)])["input_ids"].shape == (1, 8)
    assert DataCollator(pad_to_multiple_of=4).collate([_item(5)])["labels"].shape == (1, 8)
    assert DataCollator(pad_to_multiple_of=4).collate([_item(4)])["labels"].shape == (1, 4)
    assert DataCollator(max_length=8, pad_to_multiple_of=4)([_item(2)])["input_ids"].shape == (1, 8)


def test_collate_without_labels_and_numpy_rows():
    batch = DataCollator()([{"input_ids": np.array([1, 2], dtype=np.int32)}, {"input_ids": [3]}])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[1, 2], [3, 0]]


@pytest.mark.parametrize("batch, message", [
    ([], "non-empty list of examples"),
    ({"input_ids": [1]}, "non-empty list of examples"),
    ([_item(2), {"labels": [1]}], r"batch\[1\] must be a dict with 'input_ids'"),
    ([{"input_ids": [1, 2], "labels": [1]}], r"batch\[0\] has 2 input_ids but 1 labels"),
    ([_item(2), {"input_ids": [1]}], r"batch\[1\] lacks 'labels' unlike batch\[0\]"),
    ([{"input_ids": []}], r"batch\[0\]\['input_ids'\] is empty"),
    ([{"input_ids": [1, -4]}], "negative id -4"),
    ([{"input_ids": [1.5]}], "must be a 1-D list of ints"),
    ([_item(9)], "9 tokens, more than max_length=8"),
])
def test_collate_refuses_bad_batches(batch, message):
    with pytest.raises(ValueError, match=message):
        DataCollator(max_length=8).collate(batch)


def test_collator_arguments_are_checked():
    with pytest.raises(ValueError, match="pad_token_id must be an int >= 0"):
        DataCollator(pad_token_id=-1)
    with pytest.raises(ValueError, match="not a multiple of pad_to_multiple_of"):
        DataCollator(max_length=10, pad_to_multiple_of=4)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive int"):
        DataCollator(pad_to_multiple_of=0)


# --- DataLoader ---------------------------------------------------------------------------

def _epoch(loader, epoch):
    return [idx.tolist() for idx in loader.batch_indices(epoch)]


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 60), st.integers(1, 9), st.booleans(), st.booleans(), st.booleans(),
       st.integers(0, 5))
def test_every_example_appears_once_per_epoch(n, batch_size, shuffle, drop_last, grouped, epoch):
    if drop_last and n < batch_size:
        return
    dataset = Items([1 + (7 * i) % 13 for i in range(n)])
    loader = DataLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last,
                        group_by_length=grouped)
    batches = _epoch(loader, epoch)
    assert len(batches) == len(loader)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen))
    if drop_last:
        assert all(len(b) == batch_size for b in batches) and len(seen) == len(loader) * batch_size
    else:
        assert sorted(seen) == list(range(n))
        assert all(len(b) == batch_size for b in batches[:-1]) or grouped


def test_order_depends_only_on_seed_and_epoch():
    dataset = Items([3] * 23)
    a, b = DataLoader(dataset, 4, seed=5), DataLoader(dataset, 4, seed=5)
    walked = [[batch["input_ids"].tolist() for batch in a] for _ in range(3)]  # epochs 0, 1, 2
    assert a.epoch == 3
    b.set_epoch(2)  # a resumed run jumps straight to epoch 2
    assert [batch["input_ids"].tolist() for batch in b] == walked[2]
    assert walked[0] != walked[1] != walked[2]
    assert _epoch(DataLoader(dataset, 4, seed=6), 0) != _epoch(a, 0)


def test_iter_epoch_resumes_mid_epoch():
    loader = DataLoader(Items(range(1, 20)), 3, seed=1)
    full = [b["input_ids"].tolist() for b in loader.iter_epoch(4)]
    assert [b["input_ids"].tolist() for b in loader.iter_epoch(4, start_batch=5)] == full[5:]
    assert list(loader.iter_epoch(4, start_batch=len(loader))) == []
    with pytest.raises(ValueError, match=r"start_batch must be an int in \[0, 7\]"):
        loader.iter_epoch(4, start_batch=8)


def test_without_shuffle_batches_are_in_order():
    loader = DataLoader(Items([2] * 7), 3, shuffle=False)
    assert _epoch(loader, 0) == _epoch(loader, 9) == [[0, 1, 2], [3, 4, 5], [6]]
    assert len(loader) == 3
    assert len(DataLoader(Items([2] * 7), 3, drop_last=True)) == 2


def test_group_by_length_cuts_padding():
    rng = np.random.default_rng(0)
    dataset = Items(rng.integers(1, 100, size=400).tolist())

    def padding(loader):
        return sum(int((1 - b["attention_mask"]).sum()) for b in loader.iter_epoch(0))

    plain = padding(DataLoader(dataset, 8))
    grouped = padding(DataLoader(dataset, 8, group_by_length=True))
    assert grouped < 0.2 * plain
    # the grouped order is still random: two epochs differ
    loader = DataLoader(dataset, 8, group_by_length=True)
    assert _epoch(loader, 0) != _epoch(loader, 1)


def test_default_collator_pads_with_the_dataset_tokenizers_pad_id():
    dataset = Items([1, 3])
    dataset.tokenizer = type("T", (), {"pad_token_id": 9})()
    batch = next(iter(DataLoader(dataset, 2, shuffle=False)))
    assert batch["input_ids"][0].tolist() == [0, 9, 9]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
    (dict(batch_size=2, seed=-1), ValueError, "seed must be an int >= 0"),
    (dict(batch_size=9, drop_last=True), ValueError, "gives no batch at all"),
    (dict(batch_size=2, collator=3), TypeError, "collator must be"),
])
def test_loader_arguments_are_checked(kwargs, error, message):
    with pytest.raises(error, match=message):
        DataLoader(Items([1] * 5), **kwargs)


def test_loader_refuses_empty_and_non_datasets():
    with pytest.raises(ValueError, match="dataset is empty"):
        DataLoader(Items([]), 2)
    with pytest.raises(TypeError, match="dataset must support len"):
        DataLoader(5, 2)
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        DataLoader(Items([1]), 1).set_epoch(-1)


# --- train_test_split -------------------------------------------------------------------

RECORDS = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(10)]


def test_split_is_disjoint_complete_and_seeded(tmp_path):
    train, test = train_test_split(RECORDS, test_size=0.25, seed=3)
    assert len(test) == 3 and len(train) == 7  # ceil(2.5)
    assert sorted(r["instruction"] for r in train + test) == sorted(r["instruction"] for r in RECORDS)
    assert train_test_split(RECORDS, 0.25, seed=3) == (train, test)
    assert train_test_split(RECORDS, 0.25, seed=4) != (train, test)
    assert train_test_split(RECORDS, 2, shuffle=False)[1] == RECORDS[-2:]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS))
    assert train_test_split(path, 0.25, seed=3) == (train, test)


@pytest.mark.parametrize("test_size, message", [
    (0.0, r"must be in \(0, 1\)"), (1.0, r"must be in \(0, 1\)"), (10, "both parts need"),
    (0, "both parts need"),
])
def test_split_refuses_sizes_that_leave_a_part_empty(test_size, message):
    with pytest.raises(ValueError, match=message):
        train_test_split(RECORDS, test_size)
    with pytest.raises(ValueError, match="record 1: missing required field 'output'"):
        train_test_split([RECORDS[0], {"instruction": "x"}], 0.5)
