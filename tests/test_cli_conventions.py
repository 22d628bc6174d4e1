"""The `fastlora` command behaves as users of transformers' scripts expect: Hugging Face's flag
names, no abbreviations, "did you mean", help and defaults on every option, --version and
`python -m fastlora`, the API's defaults, and a word where it would otherwise say nothing."""
import argparse
import inspect
import json
import subprocess
import sys

import pytest

import fastlora as fl
from fastlora import assets, defaults
from fastlora.cli import build_parser, main


def _train(*flags):
    return build_parser().parse_args(["train", "--data", "d.json", *flags])


@pytest.mark.parametrize("ours,theirs", [
    (["--out", "run"], ["--output-dir", "run"]),
    (["--out", "run"], ["--output_dir", "run"]),
    (["--lr", "0.01"], ["--learning-rate", "0.01"]),
    (["--lr", "0.01"], ["--learning_rate", "0.01"]),
    (["--epochs", "5"], ["--num-epochs", "5"]),
    (["--epochs", "5"], ["--num-train-epochs", "5"]),
    (["--grad-accum", "4"], ["--gradient-accumulation-steps", "4"]),
    (["--lora-rank", "8"], ["--lora-r", "8"]),
    (["--lora-rank", "8"], ["--lora_r=8"]),
    (["--batch-size", "2"], ["--per-device-train-batch-size", "2"]),
    (["--save-every", "10"], ["--save-steps", "10"]),
    (["--overwrite"], ["--overwrite-output-dir"]),
])
def test_hugging_face_flag_names(ours, theirs):
    base = ["--out", "o"] if "run" not in ours else []
    assert vars(_train(*base, *ours)) == vars(_train(*base, *theirs))


@pytest.mark.parametrize("argv,message", [
    (["train", "--data", "d", "--out", "o", "--epoch", "3"], "unrecognized argument --epoch; did you mean --epochs?"),
    (["train", "--dta", "d", "--out", "o"], "unrecognized argument --dta; did you mean --data?"),
    (["train", "--data", "d", "--out", "o", "--lora-ra=4"], "did you mean --lora-r"),
    (["trian"], "unknown command 'trian'; did you mean train?"),
    (["--verison"], "did you mean --version?"),
    (["generate", "--instruction", "x", "--zzz"], "unrecognized argument --zzz\n"),
])
def test_no_abbreviations_and_did_you_mean(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_value_that_looks_like_a_flag_is_left_alone():
    args = build_parser().parse_args(["generate", "--instruction", "--not a flag, a sentence"])
    assert args.instruction == "--not a flag, a sentence"


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"fastlora {name} {action.option_strings} has no help"
        text = sub.format_help()
        for action in sub._actions:
            if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings != ["-h", "--help"]:
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)


def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"fastlora {fl.__version__}"
    done = subprocess.run([sys.executable, "-m", "fastlora", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"fastlora {fl.__version__}"


def test_the_command_and_the_api_share_their_defaults():
    args = _train("--out", "o")
    assert args.weight_decay == defaults.WEIGHT_DECAY == inspect.signature(fl.AdamW).parameters["weight_decay"].default
    for helper in (fl.train_full_finetune, fl.train_lora, fl.train_qlora):
        assert inspect.signature(helper).parameters["weight_decay"].default == defaults.WEIGHT_DECAY
    assert args.epochs == defaults.EPOCHS and args.lora_targets == ",".join(defaults.LORA_TARGETS)
    assert args.lora_alpha is None  # LoRAModel's rule: alpha = rank
    assert inspect.signature(fl.LoRAModel).parameters["alpha"].default is None
    assert inspect.signature(fl.train_lora).parameters["alpha"].default is None


def test_lora_alpha_defaults_to_the_rank(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", assets.TRAIN_DATA, "--out", str(out), "--lora-r", "4", "--max-steps", "1"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4.0


def test_train_prints_a_summary_in_transformers_terms(tmp_path, capsys):
    assert main(["train", "--data", assets.EVAL_DATA, "--out", str(tmp_path / "run"), "--max-steps", "2",
                 "--lora-rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "***** train metrics *****" in out
    for key in ("train_runtime", "train_loss", "train_tokens_per_second", "global_step"):
        assert key in out


@pytest.mark.parametrize("name,message", [
    ("data.jsonl", "--model {}: a dataset; --model takes a Hugging Face model folder"),
    ("notes.txt", "--model {}: not a model file; --model takes"),
    ("missing", "--model {}: no such file or folder; give a Hugging Face model folder"),
])
def test_a_model_flag_that_names_no_model(tmp_path, capsys, name, message):
    path = tmp_path / name
    if name != "missing":
        path.write_text('{"instruction": "x", "output": "y"}\n')
    assert main(["eval", "--data", assets.EVAL_DATA, "--model", str(path)]) == 2
    assert message.format(path) in capsys.readouterr().err


def test_generate_says_when_the_bundled_base_answers_nothing(capsys):
    assert main(["generate", "--instruction", "Add the two numbers.", "--input", "2 + 3"]) == 0
    captured = capsys.readouterr()
    if captured.out.strip():
        pytest.skip("the bundled base answered this one")
    assert "the model produced no answer" in captured.err and "bundled base is a toy" in captured.err


def test_unknown_characters_are_reported_once(capsys):
    _, tokenizer = assets.load_base()
    unk = tokenizer.unk_token_id
    assert unk in tokenizer.encode("café") and unk in tokenizer.encode("日本")
    tokenizer.encode_batch(["naïve", "plain"])
    err = capsys.readouterr().err
    assert err.count("characters this tokenizer has never seen") == 1 and "'é'" in err
    bpe = fl.BPETokenizer.train(["plain ascii text"] * 3, vocab_size=40)
    bpe.encode_batch(["ünïcode", "ü"])
    assert capsys.readouterr().err.count("never seen") == 1
