"""The `fastlora` command: train / resume / eval / generate on a user's files, and bad input exits 2."""
import json
import pickle

import numpy as np
import pytest

import fastlora as fl
from fastlora.cli import main
from fastlora.data import BPETokenizer, InstructionFormatter
from fastlora.tasks import make_examples


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A user's own data, tokenizer and base model on disk."""
    root = tmp_path_factory.mktemp("cli")
    records = make_examples(30, seed=3)
    fmt = InstructionFormatter()
    tok = BPETokenizer.train([fmt.format(r["instruction"], r["input"], r["output"]) for r in records],
                             vocab_size=120)
    tok.save(root / "tok.json")
    (root / "train.json").write_text(json.dumps(records[:24]))
    (root / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in records[24:]))
    fl.GPT(vocab_size=120, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=64, seed=0).save(root / "base.safetensors")
    return root


def _common(files):
    return ["--model", str(files / "base.safetensors"), "--tokenizer", str(files / "tok.json")]


def test_train_full_then_eval_and_generate(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(files / "train.json"), "--eval-data", str(files / "eval.jsonl"),
                 "--out", str(out), "--epochs", "1", "--batch-size", "8", *_common(files)]) == 0
    printed = capsys.readouterr().out
    assert "model written to" in printed and "eval loss" in printed
    assert (out / "model.safetensors").exists() and (out / "checkpoint.safetensors").exists()
    assert main(["eval", "--data", str(files / "eval.jsonl"), "--model", str(out / "model.safetensors"),
                 "--tokenizer", str(files / "tok.json"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["loss"] > 0 and 0 <= metrics["accuracy"] <= 1
    assert main(["generate", "--instruction", "Add the two numbers.", "--input", "2 + 3",
                 "--max-new-tokens", "4", *_common(files)]) == 0


def test_train_lora_resume_continues_the_run(files, tmp_path, capsys):
    out = tmp_path / "lora"
    args = ["train", "--data", str(files / "train.json"), "--out", str(out), "--lora-rank", "4",
            "--batch-size", "8", "--epochs", "2", *_common(files)]
    assert main(args + ["--max-steps", "3"]) == 0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4
    first = json.loads((out / "checkpoint.safetensors.json").read_text())
    assert first["step"] == 3
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    # 24 records in batches of 8 for 2 epochs: the resumed run finishes the 6 planned steps and
    # its schedule decays over those 6 (not the 3 the first run stopped at)
    done = json.loads((out / "checkpoint.safetensors.json").read_text())
    assert done["step"] == 6 and len(done["losses"]) == 6
    assert done["losses"][:3] == first["losses"]
    assert done["schedule"]["total_steps"] == 6 and done["schedule"]["last_step"] == 6
    assert main(["eval", "--data", str(files / "eval.jsonl"), "--adapter", str(out / "adapter"),
                 *_common(files)]) == 0


def test_ctrl_c_exits_130_after_saving_a_checkpoint_that_resumes(files, tmp_path, capsys, monkeypatch):
    import fastlora.train.trainer as trainer_module
    out = tmp_path / "cut"
    args = ["train", "--data", str(files / "train.json"), "--out", str(out), "--batch-size", "8",
            "--epochs", "2", *_common(files)]
    real_step, steps = trainer_module.Trainer._train_step, []

    def ctrl_c_at_step_4(self, *a):
        steps.append(1)
        if len(steps) == 4:
            raise KeyboardInterrupt
        return real_step(self, *a)

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", ctrl_c_at_step_4)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 3; resume from" in err and "fastlora train: interrupted" in err
    monkeypatch.setattr(trainer_module.Trainer, "_train_step", real_step)
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "checkpoint.safetensors.json").read_text())["step"] == 6


def test_bad_input_exits_2_with_one_clear_line(files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", "x.json", "--out", str(tmp_path), "--no-such-flag"])
    assert exc.value.code == 2
    capsys.readouterr()

    assert main(["train", "--data", str(tmp_path / "missing.json"), "--out", str(tmp_path), *_common(files)]) == 2
    assert "missing.json" in capsys.readouterr().err

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    assert main(["train", "--data", str(broken), "--out", str(tmp_path), *_common(files)]) == 2
    assert "line 2" in capsys.readouterr().err

    pickled = tmp_path / "model.safetensors"
    pickled.write_bytes(pickle.dumps({"weights": np.zeros(3)}))
    (tmp_path / "model.safetensors.json").write_text((files / "base.safetensors.json").read_text())
    assert main(["eval", "--data", str(files / "eval.jsonl"), "--model", str(pickled),
                 "--tokenizer", str(files / "tok.json")]) == 2
    assert "never unpickles" in capsys.readouterr().err

    assert main(["train", "--data", str(files / "train.json"), "--out", str(tmp_path / "r"), "--resume",
                 *_common(files)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_resume_with_another_model_shape_is_refused(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(files / "train.json"), "--out", str(out), "--max-steps", "1",
                 *_common(files)]) == 0
    wide = tmp_path / "wide.safetensors"
    fl.GPT(vocab_size=120, embed_dim=48, num_heads=4, num_layers=2, max_seq_len=64).save(wide)
    capsys.readouterr()
    assert main(["train", "--data", str(files / "train.json"), "--out", str(out), "--resume", "--model", str(wide),
                 "--tokenizer", str(files / "tok.json")]) == 2
    assert "'embed.weight' has shape (120, 32) in the checkpoint but (120, 48)" in capsys.readouterr().err
