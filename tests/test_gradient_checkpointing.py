"""Gradient checkpointing: the same loss and gradients (dropout and LoRA dropout included), less
memory held through the backward, and the switch's bookkeeping."""
import tracemalloc

import numpy as np
import pytest

import fastlora as fl
from fastlora.lora import LoRAModel

IDS = np.random.default_rng(0).integers(0, 64, size=(2, 14))


def _step(model):
    """loss and every trainable gradient of one training step (the fused loss, as the Trainer)."""
    for p in model.parameters():
        p.grad = None
    loss = model.loss(IDS, IDS)
    loss.backward()
    return float(loss.data), {n: p.grad.copy() for n, p in model.named_parameters() if p.grad is not None}


def _same_steps(plain, checkpointed, steps=2):
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    for _ in range(steps):  # a second step: the random streams went on as without checkpointing
        (la, ga), (lb, gb) = _step(plain), _step(checkpointed)
        assert la == pytest.approx(lb, abs=1e-12) and ga.keys() == gb.keys() and ga
        for name in ga:
            np.testing.assert_allclose(gb[name], ga[name], rtol=0, atol=1e-6, err_msg=name)


def test_gpt_gradients_are_the_same_with_dropout():
    model = fl.GPT(vocab_size=64, embed_dim=16, num_heads=2, num_layers=3, max_seq_len=16, dropout=0.2,
                   seed=1, dtype=np.float64)
    _same_steps(model.copy(), model.copy())


def test_lora_with_dropout_on_a_frozen_base_trains_the_same():
    base = fl.GPT(vocab_size=64, embed_dim=16, num_heads=2, num_layers=2, max_seq_len=16, seed=2, dtype=np.float64)
    models = []
    for _ in range(2):
        lora = LoRAModel(base.copy(), target_modules=["q_proj", "v_proj", "fc1"], rank=4, dropout=0.3, seed=5)
        lora.inject_lora()
        models.append(lora)
    # the blocks' inputs need no gradient (frozen embedding): only the LoRA weights do
    _same_steps(*models)


def test_llama_gradients_are_the_same():
    model = fl.Llama(vocab_size=64, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_seq_len=16, dtype=np.float64)
    _same_steps(model.copy(), model.copy())


def test_disable_copies_and_no_grad():
    model = fl.GPT(vocab_size=64, embed_dim=16, num_heads=2, num_layers=2, max_seq_len=16, seed=3)
    names = list(model.state_dict())
    model.gradient_checkpointing_enable()
    clone = model.copy()
    assert clone.is_gradient_checkpointing and clone.blocks[1].forward.block is clone.blocks[1]
    assert list(model.state_dict()) == names
    plain = model.copy().gradient_checkpointing_disable()
    assert not plain.is_gradient_checkpointing
    with fl.no_grad():
        np.testing.assert_array_equal(model(IDS).data, plain(IDS).data)
    np.testing.assert_array_equal(model(IDS).data, plain(IDS).data)


def _peak_of_a_step(model):
    tracemalloc.start()
    try:
        model.loss(IDS_LONG, IDS_LONG).backward()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


IDS_LONG = np.random.default_rng(1).integers(0, 64, size=(2, 128))


def test_the_backward_holds_one_block_at_a_time():
    model = fl.GPT(vocab_size=64, embed_dim=32, num_heads=4, num_layers=6, max_seq_len=128, seed=4)
    plain = _peak_of_a_step(model)
    model.gradient_checkpointing_enable()
    checkpointed = _peak_of_a_step(model)
    assert checkpointed < 0.5 * plain, (checkpointed, plain)


def test_cli_flag_trains_the_same_run(tmp_path):
    import json

    from fastlora.cli import main
    from fastlora.data import BPETokenizer, InstructionFormatter
    from fastlora.tasks import make_examples
    records = make_examples(16, seed=1)
    fmt = InstructionFormatter()
    BPETokenizer.train([fmt.format(r["instruction"], r["input"], r["output"]) for r in records],
                       vocab_size=100).save(tmp_path / "tok.json")
    fl.GPT(vocab_size=100, embed_dim=16, num_heads=2, num_layers=2, max_seq_len=64, dropout=0.1,
           seed=0).save(tmp_path / "base.safetensors")
    (tmp_path / "d.json").write_text(json.dumps(records))
    weights = []
    for name, flag in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        assert main(["train", "--data", str(tmp_path / "d.json"), "--out", str(tmp_path / name), "--max-steps", "3",
                     "--batch-size", "4", "--model", str(tmp_path / "base.safetensors"), "--tokenizer",
                     str(tmp_path / "tok.json"), *flag]) == 0
        weights.append(fl.GPT.load(tmp_path / name / "model.safetensors").state_dict())
    base = fl.GPT.load(tmp_path / "base.safetensors").state_dict()
    assert not np.array_equal(weights[0]["blocks.0.mlp.fc1.weight"], base["blocks.0.mlp.fc1.weight"])  # trained
    for name in base:  # the same three steps, dropout masks included
        np.testing.assert_allclose(weights[1][name], weights[0][name], rtol=0, atol=1e-6, err_msg=name)
