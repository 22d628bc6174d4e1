"""The command line on a Hugging Face GPT-2 folder: train LoRA and full, eval, generate, export."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastlora as fl  # noqa: E402
from fastlora.cli import main  # noqa: E402
from fastlora.lora import LoRAModel  # noqa: E402
from fastlora.testing.hf_models import logits, make_gpt2, make_gpt2_tokenizer  # noqa: E402

RECORDS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)}
           for a in range(6) for b in range(4)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    texts = [f"### Instruction:\nAdd {a} and {b}.\n\n### Response:\n{a + b}" for a in range(20) for b in range(20)]
    tok = make_gpt2_tokenizer(folder, texts)
    make_gpt2(folder, vocab_size=len(tok), n_positions=64, eos_token_id=tok.eos_token_id,
              bos_token_id=tok.eos_token_id)
    return folder


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    return str(path)


def test_lora_train_then_peft_and_export_agree(hf_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(hf_dir), "--data", data, "--out", str(out), "--lora-rank", "4",
                 "--lora-targets", "q_proj,v_proj,fc1", "--max-steps", "4", "--batch-size", "4"]) == 0
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["base_model_name_or_path"] == str(hf_dir)

    x = np.random.default_rng(0).integers(0, 300, size=(2, 24))
    ours = LoRAModel.from_pretrained(fl.from_pretrained(hf_dir), adapter).eval()(x).data
    base = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    theirs = logits(peft.PeftModel.from_pretrained(base, adapter).eval(), x)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)
    base_logits = fl.from_pretrained(hf_dir)(x).data
    assert np.abs(ours - base_logits).max() > 1e-3  # training moved the adapter off zero

    assert main(["export", "--model", str(hf_dir), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(logits(merged, x), ours, rtol=0, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok("Add 2 and 3.")["input_ids"] == fl.load_tokenizer(hf_dir).encode("Add 2 and 3.")

    capsys.readouterr()
    assert main(["eval", "--model", str(hf_dir), "--adapter", str(adapter), "--data", data]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "merged"), "--instruction", "Add 1 and 2.",
                 "--max-new-tokens", "3"]) == 0


def test_full_finetune_writes_a_hugging_face_folder(hf_dir, data, tmp_path):
    out = tmp_path / "full"
    assert main(["train", "--model", str(hf_dir), "--data", data, "--out", str(out), "--max-steps", "2",
                 "--batch-size", "4"]) == 0
    x = np.random.default_rng(1).integers(0, 300, size=(1, 16))
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()
    np.testing.assert_allclose(logits(model, x), fl.from_pretrained(out / "model")(x).data, rtol=0, atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(out / "model").eos_token == "<|endoftext|>"


def test_bad_model_folders_exit_2_with_one_line(tmp_path, data, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--model", str(tmp_path / "empty"), "--data", data, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config.json" in err[0]
    make_gpt2(tmp_path / "notok")
    assert main(["eval", "--model", str(tmp_path / "notok"), "--data", data]) == 2
    assert "no tokenizer found beside the model" in capsys.readouterr().err


def test_a_fastlora_model_with_a_hugging_face_tokenizer(hf_dir, data, tmp_path):
    model = fl.GPT(vocab_size=len(fl.load_tokenizer(hf_dir)), embed_dim=16, num_heads=2, num_layers=1,
                   max_seq_len=64)
    model.save(tmp_path / "own.safetensors")
    out = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "own.safetensors"), "--tokenizer", str(hf_dir), "--data", data,
                 "--out", str(out), "--lora-rank", "2", "--max-steps", "2"]) == 0
    again = fl.load_tokenizer(out)
    assert again.encode("Add 2 and 3.") == fl.load_tokenizer(hf_dir).encode("Add 2 and 3.")


def test_a_llama_folder_through_train_and_export(tmp_path, data):
    from fastlora.testing.hf_models import make_llama
    folder = tmp_path / "llama"
    texts = [f"### Instruction:\nAdd {a} and {b}.\n\n### Response:\n{a + b}" for a in range(20) for b in range(20)]
    tok = make_gpt2_tokenizer(folder, texts)
    make_llama(folder, vocab_size=len(tok), max_position_embeddings=64, eos_token_id=tok.eos_token_id)
    out = tmp_path / "run"
    assert main(["train", "--model", str(folder), "--data", data, "--out", str(out), "--lora-rank", "4",
                 "--lora-targets", "all-linear", "--max-steps", "3"]) == 0
    x = np.random.default_rng(0).integers(0, len(tok), size=(2, 24))
    ours = LoRAModel.from_pretrained(fl.from_pretrained(folder), out / "adapter").eval()(x).data
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    np.testing.assert_allclose(logits(peft.PeftModel.from_pretrained(base, out / "adapter").eval(), x), ours,
                               rtol=0, atol=1e-4 * np.abs(ours).max())
    assert main(["export", "--model", str(folder), "--adapter", str(out / "adapter"), "--out", str(tmp_path / "m")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    np.testing.assert_allclose(logits(merged, x), ours, rtol=0, atol=1e-4 * np.abs(ours).max())
