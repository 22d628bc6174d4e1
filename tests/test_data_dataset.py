"""FinetuneDataset: the seed's test cases, label masking, truncation, loading and bad input."""
import json
import warnings

import numpy as np
import pytest

from fastlora.data import (BPETokenizer, CharTokenizer, DataCollator, FinetuneDataset,
                           InstructionFormatter)

FMT = InstructionFormatter()
SEED_DATA = [
    {"instruction": "Translate to French", "input": "Hello", "output": "Bonjour"},
    {"instruction": "Summarize", "input": "Long text here...", "output": "Short summary"},
]
MORE = SEED_DATA + [
    {"instruction": "Add the numbers", "input": "12 and 30", "output": "42"},
    {"instruction": "Name a colour", "output": "Blue"},  # no input at all
]


TEXTS = [FMT.format(r["instruction"], r.get("input", ""), r["output"]) for r in MORE]


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.train(TEXTS * 2, vocab_size=100)


@pytest.fixture(scope="module")
def chars():
    return CharTokenizer.from_texts(TEXTS + ["xy"])


@pytest.fixture(scope="module")
def seed_chars():
    return CharTokenizer.from_texts([FMT.format(r["instruction"], r["input"], r["output"]) for r in SEED_DATA])


@pytest.mark.parametrize("tok", ["tokenizer", "seed_chars"])
def test_seed_level1_test_cases(request, tok):
    # verbatim from the level 1 spec, with this package's BPE tokenizer (GPT vocab_size=100) and
    # with "a simple tokenizer": characters, whose template alone outgrows max_length=64 (issue 17)
    tokenizer = request.getfixturevalue(tok)
    data = SEED_DATA
    dataset = FinetuneDataset(data, tokenizer, max_length=64)
    assert len(dataset) == 2

    item = dataset[0]
    assert "input_ids" in item
    assert "labels" in item
    assert len(item["input_ids"]) <= 64

    # Labels should have -100 for instruction tokens
    assert item["labels"][0] == -100  # instruction part is masked

    collator = DataCollator()
    batch = collator.collate([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 2  # batch of 2


@pytest.mark.parametrize("tok", ["tokenizer", "chars"])
def test_prompt_is_masked_and_response_plus_eos_is_trained(request, tok):
    tok = request.getfixturevalue(tok)
    dataset = FinetuneDataset(MORE, tok, max_length=512)
    for i, record in enumerate(MORE):
        item = dataset[i]
        ids, labels = item["input_ids"], item["labels"]
        prompt = FMT.prompt(record["instruction"], record.get("input", ""))
        n_prompt = len(tok.encode(prompt))
        assert len(labels) == len(ids)
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:] == tok.encode(record["output"]) + [tok.eos_token_id]
        assert tok.decode(ids[:-1]) == FMT.format(record["instruction"], record.get("input", ""),
                                                  record["output"])
    assert "### Input:" not in tok.decode(dataset[3]["input_ids"])


def test_add_eos_false_scores_the_output_alone(chars):
    dataset = FinetuneDataset(MORE, chars, max_length=512, add_eos=False)
    for i, record in enumerate(MORE):
        n_prompt = len(chars.encode(FMT.prompt(record["instruction"], record.get("input", ""))))
        item = dataset[i]
        assert item["labels"][n_prompt:] == item["input_ids"][n_prompt:] == chars.encode(record["output"])
    with pytest.raises(ValueError, match=r"record 1: the output encodes to no tokens and add_eos=False"):
        FinetuneDataset([MORE[0], dict(MORE[1], output="")], chars, add_eos=False)


def test_train_on_inputs_trains_every_token(tokenizer):
    dataset = FinetuneDataset(SEED_DATA, tokenizer, train_on_inputs=True)
    assert dataset[0]["labels"] == dataset[0]["input_ids"]


def test_drop_truncation_keeps_the_prompt_and_cuts_the_response(chars):
    prompt_len = len(chars.encode(FMT.prompt("Summarize", "Long text here...")))
    dataset = FinetuneDataset([SEED_DATA[1]], chars, max_length=prompt_len + 3, truncation="drop")
    item = dataset[0]
    assert len(item["input_ids"]) == prompt_len + 3
    assert item["labels"][prompt_len:] == chars.encode("Sho")  # the EOS is cut too


def test_drop_truncation_drops_and_counts_records_whose_prompt_fills_max_length(chars):
    long = {"instruction": "x" * 200, "output": "y"}
    data = [SEED_DATA[0], long, SEED_DATA[1], long]
    with pytest.warns(UserWarning, match=r"dropped 2 of 4 records .*record indices \[1, 3\]"):
        dataset = FinetuneDataset(data, chars, max_length=120, truncation="drop")
    assert len(dataset) == 2 and dataset.skipped == 2 and dataset.skipped_indices == [1, 3]
    assert dataset.records == [dict(SEED_DATA[0]), dict(SEED_DATA[1])]
    for item in dataset:
        assert any(label != -100 for label in item["labels"][1:])  # never all masked
    with pytest.raises(ValueError, match="all 1 records were dropped"):
        FinetuneDataset([long], chars, max_length=120, truncation="drop")


def test_lengths_and_indexing(tokenizer):
    dataset = FinetuneDataset(MORE, tokenizer)
    assert dataset.lengths.tolist() == [len(item["input_ids"]) for item in dataset]
    assert dataset[-1] == dataset[len(dataset) - 1]
    assert dataset[np.int64(1)] == dataset[1]
    with pytest.raises(IndexError, match="index 4 out of range"):
        dataset[4]
    with pytest.raises(TypeError, match="indices must be ints"):
        dataset["0"]


def test_json_and_jsonl_files_load_the_same(tmp_path, tokenizer):
    (tmp_path / "d.json").write_text(json.dumps(MORE), encoding="utf-8")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in MORE) + "\n\n",
                                      encoding="utf-8")
    # a byte-order mark, as some editors write one, is tolerated
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "d.jsonl").read_bytes())
    expected = [FinetuneDataset(MORE, tokenizer)[i] for i in range(len(MORE))]
    for name in ("d.json", "d.jsonl", "bom.jsonl"):
        for path in (tmp_path / name, str(tmp_path / name)):
            assert list(FinetuneDataset(path, tokenizer)) == expected


def test_extra_keys_are_ignored(tokenizer):
    data = [dict(SEED_DATA[0], id=7, source="web")]
    assert FinetuneDataset(data, tokenizer)[0] == FinetuneDataset(SEED_DATA[:1], tokenizer)[0]


def _write(tmp_path, name, content):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


GOOD = json.dumps(SEED_DATA[0])
BAD_FILES = [
    ("d.json", json.dumps({"data": SEED_DATA}), "must hold a list of objects, got a object"),
    ("d.json", json.dumps([SEED_DATA[0], "text"]), "record 1 is a string, expected an object"),
    ("d.json", json.dumps([{"output": "x"}]), "record 0: missing required field 'instruction'"),
    ("d.json", json.dumps([SEED_DATA[0], {"instruction": "x"}]),
     "record 1: missing required field 'output'"),
    ("d.json", json.dumps([{"instruction": "x", "input": 3, "output": "y"}]),
     "record 0: field 'input' must be a string, got number 3"),
    ("d.json", json.dumps([{"instruction": None, "output": "y"}]),
     "field 'instruction' must be a string, got null"),
    ("d.json", "[]", "empty dataset"),
    ("d.jsonl", "\n\n", "empty dataset"),
    ("d.json", '[{"instruction": "x",\n "output": }]', "line 2: not valid JSON"),
    ("d.jsonl", GOOD + "\n" + GOOD[:-3] + "\n" + GOOD, "line 2: not valid JSON"),
    ("d.jsonl", GOOD + "\n\n" + json.dumps({"instruction": "x", "output": ["y"]}),
     r"record 1 \(line 3\): field 'output' must be a string, got array"),
    ("d.jsonl", GOOD + "\n[1]", r"record 1 \(line 2\) is a array"),
    ("d.jsonl", (GOOD + "\n").encode() + b'{"instruction": "caf\xe9", "output": "x"}',
     "line 2: not valid UTF-8"),
    ("d.txt", GOOD, "unsupported file type '.txt'"),
    ("d.json", json.dumps([{"instruction": "a\n### Response:\nb", "output": "c"}]),
     "record 0: instruction contains text that reads as a section header"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES)
def test_bad_files_name_the_file_the_record_and_the_field(tmp_path, tokenizer, name, content,
                                                          message):
    path = _write(tmp_path, name, content)
    with pytest.raises(ValueError, match=message) as info:
        FinetuneDataset(path, tokenizer)
    assert str(path) in str(info.value)


def test_missing_file_and_directory(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        FinetuneDataset(tmp_path / "nope.jsonl", tokenizer)
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        FinetuneDataset(tmp_path / "dir.json", tokenizer)


def test_bad_list_input_and_arguments(tokenizer):
    with pytest.raises(ValueError, match=r"data: record 1: missing required field 'output'"):
        FinetuneDataset([SEED_DATA[0], {"instruction": "x"}], tokenizer)
    with pytest.raises(ValueError, match="data: empty dataset"):
        FinetuneDataset([], tokenizer)
    with pytest.raises(TypeError, match="data must be a list of dicts or a path"):
        FinetuneDataset({"instruction": "x", "output": "y"}, tokenizer)
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        FinetuneDataset(SEED_DATA, tokenizer, max_length=1)
    with pytest.raises(TypeError, match="lacks"):
        FinetuneDataset(SEED_DATA, object())


class ListTokenizer:
    """A duck-typed tokenizer, the shape a wrapped Hugging Face tokenizer would have."""

    vocab_size, pad_token_id, eos_token_id = 300, 0, 1

    def __init__(self, offset=2):
        self.offset = offset

    def encode(self, text):
        return [self.offset + ord(ch) % 250 for ch in text]

    def decode(self, ids):
        return "".join(chr(i - self.offset) for i in ids)


def test_any_object_with_the_tokenizer_protocol_works():
    dataset = FinetuneDataset(SEED_DATA, ListTokenizer())
    assert dataset[0]["input_ids"][-1] == 1 and dataset[0]["labels"][0] == -100
    with pytest.raises(ValueError, match=r"data: record 0: tokenizer.encode\(instruction/input\) "
                                         r"returned id .* outside \[0, vocab_size = 300\)"):
        FinetuneDataset(SEED_DATA, ListTokenizer(offset=250))


def test_ids_from_a_package_tokenizer_are_range_checked_too(chars):
    class Broken(CharTokenizer):
        def _encode_ordinary(self, text):
            return [self.vocab_size + 5] if text == "Short summary" else super()._encode_ordinary(text)

    broken = Broken(chars.alphabet)
    with pytest.raises(ValueError, match=r"data: record 1: the tokenizer returned id \d+ outside"):
        FinetuneDataset(SEED_DATA, broken)


def test_nothing_is_half_loaded(tmp_path, tokenizer):
    # the bad record comes last: the error must still surface, with no dataset built
    lines = [json.dumps(r) for r in MORE] + ['{"instruction": "x", "output": 5}']
    path = _write(tmp_path, "d.jsonl", "\n".join(lines))
    dataset = None
    with pytest.raises(ValueError, match=r"record 4 \(line 5\)"):
        dataset = FinetuneDataset(path, tokenizer)
    assert dataset is None


def test_batches_feed_the_model_and_loss(tokenizer):
    import fastlora as fl
    dataset = FinetuneDataset(MORE, tokenizer, max_length=64)
    batch = DataCollator(tokenizer.pad_token_id).collate([dataset[i] for i in range(len(MORE))])
    model = fl.GPT(vocab_size=100, embed_dim=16, num_heads=2, num_layers=1, max_seq_len=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = fl.cross_entropy(model(batch["input_ids"]), batch["labels"])
    assert np.isfinite(float(loss.data)) and float(loss.data) > 0
