"""Record formats in FinetuneDataset: chat, ShareGPT, text, field maps, files, and bad input."""
import json

import numpy as np
import pytest

from fastlora.data import BPETokenizer, CharTokenizer, FinetuneDataset, InstructionFormatter
from fastlora.data.chat import CHATML_TEMPLATE, render
from fastlora.data.formats import parse_field_map

pytest.importorskip("jinja2")

FMT = InstructionFormatter()
SEED_DATA = [
    {"instruction": "Translate to French", "input": "Hello", "output": "Bonjour"},
    {"instruction": "Summarize", "input": "Long text here...", "output": "Short summary"},
]
CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Capital of France?"},
                     {"role": "assistant", "content": "Paris."},
                     {"role": "user", "content": "And of Italy?"},
                     {"role": "assistant", "content": "Rome."}]}
SHAREGPT = {"system": "Be brief.",
            "conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."},
                              {"from": "human", "value": "And of Italy?"}, {"from": "gpt", "value": "Rome."}]}
TEXT = {"text": "Plain text for continued pretraining."}


def _scored_text(tok, item):
    """The decoded runs of scored tokens of one item."""
    runs, run = [], []
    for i, label in zip(item["input_ids"], item["labels"]):
        if label == -100:
            if run:
                runs.append(tok.decode(run))
            run = []
        else:
            run.append(i)
    return runs + ([tok.decode(run)] if run else [])


@pytest.fixture(scope="module")
def chars():
    texts = [FMT.format(**r) for r in SEED_DATA] + [render(CHATML_TEMPLATE, CHAT["messages"]), TEXT["text"]]
    return CharTokenizer.from_texts(texts)


@pytest.fixture(scope="module")
def bpe(chars):
    texts = [FMT.format(**r) for r in SEED_DATA] + [render(CHATML_TEMPLATE, CHAT["messages"]), TEXT["text"]]
    return BPETokenizer.train(texts * 3, vocab_size=120)


def test_a_character_tokenizer_at_max_length_64_keeps_each_answer_and_the_end_of_its_prompt():
    # issue 17: the template alone is ~68 characters, so every record used to be dropped
    # (test_data_dataset.py runs the seed's level-1 test itself with this tokenizer)
    tokenizer = CharTokenizer.from_texts([FMT.format(**r) for r in SEED_DATA])
    dataset = FinetuneDataset(SEED_DATA, tokenizer, max_length=64)
    for item, record in zip(dataset, SEED_DATA):
        assert len(item["input_ids"]) == 64 and item["labels"][0] == -100
        assert _scored_text(tokenizer, item) == [record["output"] + "<eos>"]
        assert tokenizer.decode(item["input_ids"]).endswith(f"### Response:\n{record['output']}<eos>")
    assert dataset.truncated == 2  # both are longer than 64 characters


@pytest.mark.parametrize("tok", ["chars", "bpe"])
def test_chat_records_render_chatml_and_score_only_the_assistant_turns(request, tok):
    tok = request.getfixturevalue(tok)
    item = FinetuneDataset([CHAT], tok, max_length=512)[0]
    assert tok.decode(item["input_ids"]) == render(CHATML_TEMPLATE, CHAT["messages"])  # no eos added
    # each assistant turn: what the model must produce after "<|im_start|>assistant\n"
    assert _scored_text(tok, item) == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]


@pytest.mark.parametrize("tok", ["chars", "bpe"])
def test_sharegpt_reads_as_the_same_chat(request, tok):
    tok = request.getfixturevalue(tok)
    assert FinetuneDataset([SHAREGPT], tok)[0] == FinetuneDataset([CHAT], tok)[0]


def test_text_records_score_every_token_and_eos(bpe):
    item = FinetuneDataset([TEXT], bpe)[0]
    assert item["input_ids"] == bpe.encode(TEXT["text"]) + [bpe.eos_token_id]
    assert item["labels"] == item["input_ids"]


def test_formats_mix_in_one_dataset(bpe):
    ds = FinetuneDataset([SEED_DATA[0], CHAT, TEXT, SHAREGPT], bpe, max_length=512)
    assert ds[1] == ds[3] and ds[0] == FinetuneDataset(SEED_DATA[:1], bpe)[0]


def test_field_map_from_a_dict_and_from_text(bpe):
    renamed = [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in SEED_DATA]
    field_map = {"instruction": "question", "input": "context", "output": "answer"}
    want = list(FinetuneDataset(SEED_DATA, bpe))
    assert list(FinetuneDataset(renamed, bpe, field_map=field_map)) == want
    assert list(FinetuneDataset(renamed, bpe, field_map="instruction=question, input=context,output=answer")) == want
    chat = {"dialog": [{"speaker": m["role"], "text": m["content"]} for m in CHAT["messages"]]}
    assert FinetuneDataset([chat], bpe, field_map={"messages": "dialog", "role": "speaker",
                                                   "content": "text"})[0] == FinetuneDataset([CHAT], bpe)[0]
    assert parse_field_map("instruction=q") == {"instruction": "q"}
    with pytest.raises(ValueError, match="'prompt' is not a field fastlora reads"):
        FinetuneDataset(renamed, bpe, field_map={"prompt": "question"})
    with pytest.raises(ValueError, match="'output' is not of the form ours=theirs"):
        parse_field_map("instruction=q,output")
    with pytest.raises(ValueError, match=r"data: record 0: missing required field 'answer' \(mapped to "
                                         r"'output' by field_map\)"):
        FinetuneDataset([{"question": "q"}], bpe, field_map=field_map)


def _parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    return path


@pytest.mark.parametrize("rows", [SEED_DATA * 3, [CHAT, CHAT, CHAT], [SHAREGPT] * 3, [TEXT] * 3])
def test_json_jsonl_and_parquet_load_the_same(tmp_path, bpe, rows):
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    _parquet(tmp_path / "d.parquet", rows)
    want = list(FinetuneDataset(rows, bpe, max_length=512))
    for name in ("d.json", "d.jsonl", "d.parquet"):
        ds = FinetuneDataset(tmp_path / name, bpe, max_length=512)
        assert list(ds) == want
        # a streamed file's records are read back from it, in the canonical form
        assert list(ds.records) == FinetuneDataset(rows, bpe, max_length=512).records


BAD = [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
     r"record 1 \(line 2\): messages\[1\]: unknown role 'bot' in field 'role'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "yo"}]},
     r"record 1 \(line 2\): conversations\[1\]: unknown role 'robot' in field 'from'; ShareGPT roles are human, gpt"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]},
     r"record 1 \(line 2\): field 'messages' has no assistant turn"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, r"record 1 \(line 2\): field 'conversations' has no "
                                                            r"assistant turn"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\]: field 'content' must be a string, got number"),
    ({"messages": []}, "field 'messages' is an empty conversation"),
    ({"messages": "hi"}, "field 'messages' must be a list of messages, got string"),
    ({"text": 5}, "field 'text' must be a string"),
    ({"prompt": "x", "completion": "y"}, r"record 1 \(line 2\): no field of a known format: .*the record has "
                                         r"\['prompt', 'completion'\]"),
]


@pytest.mark.parametrize("record, message", BAD)
def test_bad_records_name_the_file_the_record_and_the_field(tmp_path, bpe, record, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(CHAT) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        FinetuneDataset(path, bpe)
    assert str(path) in str(info.value)


def test_parquet_without_the_mapped_columns_is_refused(tmp_path, bpe):
    path = _parquet(tmp_path / "d.parquet", [{"question": "q", "reply": "a"}])
    with pytest.raises(ValueError, match=r"d.parquet: no column 'answer' for its alpaca records \(field_map maps "
                                         r"'output' to 'answer'\); its columns are \['question', 'reply'\]"):
        FinetuneDataset(path, bpe, field_map={"instruction": "question", "output": "answer"})
    with pytest.raises(ValueError, match=r"d.parquet: no columns of a known format"):
        FinetuneDataset(path, bpe)


def test_a_template_that_forbids_the_order_names_the_record(tmp_path, bpe):
    from fastlora.testing.hf_models import make_gpt2_tokenizer
    pytest.importorskip("transformers")
    import fastlora as fl
    hf = make_gpt2_tokenizer(tmp_path, ["hello there"] * 10)
    hf.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    hf.save_pretrained(tmp_path)
    tok = fl.load_tokenizer(tmp_path)
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"}]}
    with pytest.raises(ValueError, match=r"data: record 1: the chat template failed: roles must alternate.*"
                                         r"\(at messages\[1\], role 'user'\)"):
        FinetuneDataset([{"messages": CHAT["messages"][1:3]}, bad], tok)


# a ChatML template with the {% generation %} block TRL's assistant_only_loss reads
CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    pytest.importorskip("transformers")
    from fastlora.testing.hf_models import make_chat_tokenizer
    texts = [m["content"] for m in CHAT["messages"]] * 20
    folders = {}
    for name, template in (("generation", CHATML_GENERATION), ("none", None)):
        folders[name] = tmp_path_factory.mktemp(name)
        make_chat_tokenizer(folders[name], texts, template)
    return folders


def test_generation_blocks_score_what_transformers_masks(hf_folders):
    import transformers

    import fastlora as fl
    theirs = transformers.AutoTokenizer.from_pretrained(hf_folders["generation"])
    out = theirs.apply_chat_template(CHAT["messages"], tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    item = FinetuneDataset([CHAT], fl.load_tokenizer(hf_folders["generation"]), max_length=512)[0]
    assert item["input_ids"] == list(out["input_ids"])
    assert [label != -100 for label in item["labels"]] == [bool(m) for m in out["assistant_masks"]]


def test_without_generation_blocks_the_turns_are_found_by_rendering_prefixes(hf_folders):
    import transformers

    import fastlora as fl
    theirs = transformers.AutoTokenizer.from_pretrained(hf_folders["none"])
    tok = fl.load_tokenizer(hf_folders["none"])
    item = FinetuneDataset([CHAT], tok, max_length=512)[0]
    ids = theirs.apply_chat_template(CHAT["messages"], tokenize=True, chat_template=CHATML_TEMPLATE)
    assert item["input_ids"] == list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert _scored_text(tok, item) == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]
    # the generation prompt is exactly the unscored tokens before the last answer
    ds = FinetuneDataset([CHAT], tok, max_length=512)
    prompt, reference, stops = ds.prompt_and_reference(0)
    want = theirs.apply_chat_template(CHAT["messages"][:4], tokenize=True, add_generation_prompt=True,
                                      chat_template=CHATML_TEMPLATE)
    assert prompt.tolist() == list(want["input_ids"] if hasattr(want, "keys") else want)
    assert item["input_ids"][:len(prompt)] == prompt.tolist() and item["labels"][len(prompt) - 1] == -100
    assert (reference, stops) == ("Rome.", ["<|im_end|>"])


# --- truncation ------------------------------------------------------------------------------------

def test_keep_response_gives_the_response_up_to_half_and_the_prompt_the_rest():
    from fastlora.data.truncation import budget_split, truncate
    for L in (2, 7, 64):
        for p in range(0, 80, 3):
            for r in range(1, 80, 5):
                kp, kr = budget_split(p, r, L)
                if p + r <= L:
                    assert (kp, kr) == (p, r)
                    continue
                assert kp + kr == L and 1 <= kr <= r and 0 <= kp <= p  # the whole budget, never no answer
                assert kr == min(r, max(L // 2, L - p))  # up to half, more where the prompt is short
    ids = np.arange(30)
    scored = np.arange(30) >= 20  # prompt 20, response 10
    kept, flags = truncate(ids, scored, 16, "keep_response")
    assert kept.tolist() == list(range(12, 28)) and flags.tolist() == [False] * 8 + [True] * 8
    kept, flags = truncate(ids, scored, 24, "drop")  # the old way: cut at the end
    assert kept.tolist() == list(range(24)) and flags.sum() == 4
    assert truncate(ids, scored, 20, "drop") is None  # the prompt alone fills it
    assert truncate(ids, scored, 21, "drop")[1].sum() == 1


def test_response_starts_is_the_start_of_the_last_scored_run():
    from fastlora.data.truncation import response_start, response_starts
    rng = np.random.default_rng(0)
    examples = [rng.random(n) < 0.4 for n in rng.integers(1, 12, size=200)]
    examples = [e if e.any() else np.r_[e, True] for e in examples]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in examples])])
    assert response_starts(np.concatenate(examples), offsets).tolist() == [response_start(e) for e in examples]


def test_multi_turn_chat_keeps_the_last_answer_and_the_turns_just_before_it(bpe):
    full = FinetuneDataset([CHAT], bpe, max_length=512)[0]
    cut = FinetuneDataset([CHAT], bpe, max_length=20)[0]
    assert len(cut["input_ids"]) == 20 and cut["input_ids"] == full["input_ids"][-20:]
    assert _scored_text(bpe, cut)[-1] == "Rome.<|im_end|>\n"


# --- large records and files -----------------------------------------------------------------------

LONG = "The fox and the dog went over the hill. " * 600  # 24,000 characters


@pytest.mark.parametrize("truncation", ["keep_response", "drop"])
@pytest.mark.parametrize("record", [
    {"instruction": "Sum up.", "input": LONG, "output": LONG},
    {"instruction": LONG, "input": "", "output": "short"},
    {"text": LONG},
    {"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": LONG}]},
], ids=["alpaca", "long-prompt", "text", "chat"])
def test_a_huge_field_is_tokenized_clipped_with_the_same_result(monkeypatch, bpe, record, truncation):
    import fastlora.data.dataset as dataset_module

    def build():  # the examples, or the error when "drop" drops the record
        try:
            ds = FinetuneDataset([record], bpe, max_length=16, truncation=truncation)
        except ValueError as exc:
            return str(exc)
        return list(ds), ds.truncated
    whole = build()
    calls = []
    real = dataset_module.FinetuneDataset._encode_one
    monkeypatch.setattr(dataset_module, "WINDOW", 0)  # the window is then 256 * max_length = 4096 characters
    monkeypatch.setattr(dataset_module.FinetuneDataset, "_encode_one",
                        lambda self, r, at: calls.append(max(map(len, _fields(r)))) or real(self, r, at))
    assert build() == whole
    assert max(calls) < len(LONG)  # never tokenized whole
    if truncation == "keep_response" or "prompt" not in str(whole):
        assert whole[1] == 1  # kept, and cut


def _fields(record):
    if "messages" in record:
        return [m["content"] for m in record["messages"]]
    return [v for v in record.values() if isinstance(v, str)]


def test_one_long_jsonl_line_costs_a_few_times_its_size(tmp_path, bpe):
    import tracemalloc
    path = tmp_path / "big.jsonl"
    text = "The fox and the dog went over the hill. " * 200_000  # 8 MB
    path.write_text(json.dumps({"instruction": "Sum up.", "input": text, "output": "Short summary"}) + "\n")
    size = path.stat().st_size
    del text
    tracemalloc.start()
    try:
        ds = FinetuneDataset(path, bpe, max_length=64, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(ds) == 1 and _scored_text(bpe, ds[0]) == ["Short summary<eos>"]
    assert peak < 3 * size, f"peak {peak / size:.1f} times the line"  # bytes, then text, then value


def test_a_line_longer_than_the_memory_allows_is_refused(monkeypatch, tmp_path, bpe):
    import fastlora.data.sources as sources
    monkeypatch.setattr(sources, "available_memory", lambda: 4 << 20)  # a line may hold 1 MiB
    path = tmp_path / "holes.jsonl"
    path.write_bytes(b"\0" * (3 << 20))
    with pytest.raises(ValueError, match=r"holes.jsonl: line 1 is longer than 1,048,576 bytes"):
        FinetuneDataset(path, bpe)


def test_progress_bar_and_records_read_back(tmp_path, bpe, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [CHAT, SEED_DATA[0], TEXT] * 700))
    ds = FinetuneDataset(path, bpe, max_length=256, progress=True)
    assert "tokenizing d.jsonl" in capsys.readouterr().err and len(ds) == 2100
    assert ds.records[1501] == dict(SEED_DATA[0], input="Hello") and ds.records[2099] == TEXT
    assert ds[2099] == FinetuneDataset([TEXT], bpe)[0] and ds[1500] == FinetuneDataset([CHAT], bpe, max_length=256)[0]
    again = FinetuneDataset(ds.records, bpe, max_length=256)  # another dataset's records, read back
    assert len(again) == len(ds) and again[1501] == ds[1501]


def test_the_readme_your_data_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("pyarrow")
    import re
    from pathlib import Path

    import fastlora as fl
    from fastlora.testing.hf_models import make_chat_tokenizer, make_llama
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## Your data\n.*?```python\n(.*?)```", readme, re.S).group(1)
    texts = [m["content"] for m in CHAT["messages"]] * 20 + [r["instruction"] + r["output"] for r in SEED_DATA] * 5
    make_chat_tokenizer(tmp_path / "chat-model", texts)
    vocab = fl.load_tokenizer(tmp_path / "chat-model").vocab_size
    make_llama(tmp_path / "chat-model", vocab_size=vocab, max_position_embeddings=256)
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(CHAT) for _ in range(4)))
    _parquet(tmp_path / "qa.parquet", [{"question": r["instruction"], "answer": r["output"]} for r in SEED_DATA])
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md: Your data", "exec"), scope)
    assert len(scope["packed"]) < len(scope["chat"]) and len(scope["qa"]) == 2
    assert scope["model"].is_gradient_checkpointing and len(scope["out"]) > len(scope["ids"])
