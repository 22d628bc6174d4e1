"""The `fastlora` command on chat, ShareGPT, text and renamed records, and generate's sampling flags."""
import json

import pytest

import fastlora as fl
from fastlora.cli import main
from fastlora.data import BPETokenizer, InstructionFormatter
from fastlora.data.chat import CHATML_TEMPLATE, render
from fastlora.tasks import make_examples

pytest.importorskip("jinja2")


def _chat(record):
    question = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": record["output"]}]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_data")
    records = make_examples(24, seed=5)
    fmt = InstructionFormatter()
    texts = [fmt.format(r["instruction"], r["input"], r["output"]) for r in records]
    texts += [render(CHATML_TEMPLATE, _chat(r)["messages"]) for r in records]
    BPETokenizer.train(texts, vocab_size=150).save(root / "tok.json")
    fl.GPT(vocab_size=150, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=96, seed=0).save(root / "base.safetensors")
    (root / "alpaca.json").write_text(json.dumps(records))
    (root / "chat.jsonl").write_text("\n".join(json.dumps(_chat(r)) for r in records))
    renamed = [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in records]
    (root / "renamed.jsonl").write_text("\n".join(json.dumps(r) for r in renamed))
    return root


def _common(files):
    return ["--model", str(files / "base.safetensors"), "--tokenizer", str(files / "tok.json")]


def _eval_loss(capsys, *args):
    assert main(["eval", "--json", "--exact-match-limit", "2", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_and_eval_on_chat_records(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(files / "chat.jsonl"), "--out", str(out), "--max-steps", "2",
                 "--batch-size", "4", *_common(files)]) == 0
    metrics = _eval_loss(capsys, "--data", str(files / "chat.jsonl"), *_common(files))
    assert metrics["loss"] > 0 and metrics["exact_match"] is not None


def test_field_map_reads_renamed_records_as_the_originals(files, capsys):
    want = _eval_loss(capsys, "--data", str(files / "alpaca.json"), *_common(files))
    got = _eval_loss(capsys, "--data", str(files / "renamed.jsonl"), "--field-map",
                     "instruction=question,input=context,output=answer", *_common(files))
    assert got["loss"] == want["loss"] and got["eval_tokens"] == want["eval_tokens"]
    # --truncation drop against keep_response: at 32 tokens half the prompts (25 to 43) fill the budget
    with pytest.warns(UserWarning, match="dropped 11 of 24 records"):
        drop = _eval_loss(capsys, "--data", str(files / "alpaca.json"), "--max-length", "32", "--truncation",
                          "drop", *_common(files))
    keep = _eval_loss(capsys, "--data", str(files / "alpaca.json"), "--max-length", "32", *_common(files))
    assert drop["eval_tokens"] != keep["eval_tokens"]


def test_bad_field_maps_and_records_exit_2_naming_the_flag_or_file(files, tmp_path, capsys):
    assert main(["eval", "--data", str(files / "alpaca.json"), "--field-map", "instruction", *_common(files)]) == 2
    assert "--field-map" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    assert main(["eval", "--data", str(bad), *_common(files)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "record 0 (line 1)" in err and "no assistant turn" in err


def test_generate_with_sampling_flags_and_chat(files, capsys):
    common = ["--instruction", "Add the two numbers.", "--input", "2 + 3", "--max-new-tokens", "6", *_common(files)]
    assert main(["generate", *common, "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20",
                 "--repetition-penalty", "1.3", "--stop", "\n", "--seed", "1"]) == 0
    assert "\n" not in capsys.readouterr().out.rstrip("\n")
    assert main(["generate", *common, "--chat"]) == 0
    assert "<|im_end|>" not in capsys.readouterr().out
    assert main(["generate", *common, "--top-p", "2"]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_packing_flag_trains_and_evaluates_to_the_same_loss(files, tmp_path, capsys):
    plain = _eval_loss(capsys, "--data", str(files / "alpaca.json"), *_common(files))
    packed = _eval_loss(capsys, "--data", str(files / "alpaca.json"), "--packing", *_common(files))
    assert packed["loss"] == pytest.approx(plain["loss"], abs=1e-5) and packed["eval_tokens"] == plain["eval_tokens"]
    assert main(["train", "--data", str(files / "chat.jsonl"), "--packing", "--out", str(tmp_path / "run"),
                 "--max-steps", "2", "--batch-size", "2", *_common(files)]) == 0
