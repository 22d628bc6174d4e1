"""The Trainer: seed level 2, schedule and clipping in the loop, exact resume, non-finite steps, bad checkpoints."""
import math
import pickle

import numpy as np
import pytest

import fastlora as fl
from fastlora.data import BPETokenizer, FinetuneDataset, InstructionFormatter
from fastlora.optim import SGD, AdamW
from fastlora.tasks import make_examples
from fastlora.train import Trainer, TrainingDiverged

SEED_DATA = [
    {"instruction": "Translate to French", "input": "Hello", "output": "Bonjour"},
    {"instruction": "Summarize", "input": "Long text here...", "output": "Short summary"},
]


@pytest.fixture(scope="module")
def task_data():
    records = make_examples(24, seed=0)
    fmt = InstructionFormatter()
    tok = BPETokenizer.train([fmt.format(r["instruction"], r["input"], r["output"]) for r in records],
                             vocab_size=200)
    return records, tok


def _tiny_model(tok, seed=0):
    return fl.GPT(vocab_size=tok.vocab_size, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=64, seed=seed)


def test_seed_level_2_as_written(tmp_path):
    fmt = InstructionFormatter()
    tokenizer = BPETokenizer.train([fmt.format(d["instruction"], d["input"], d["output"]) for d in SEED_DATA],
                                   vocab_size=100)
    dataset = FinetuneDataset(SEED_DATA, tokenizer, max_length=64)
    eval_dataset = FinetuneDataset(SEED_DATA[:1], tokenizer, max_length=64)
    model = fl.GPT(vocab_size=100, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=64)
    optimizer = SGD(model.parameters(), lr=0.001)
    trainer = Trainer(model, optimizer, dataset, batch_size=2, epochs=5)
    losses = trainer.train()
    assert len(losses) == 5
    assert losses[-1] < losses[0]
    path = str(tmp_path / "checkpoint.pt")
    trainer.save_checkpoint(path)
    trainer.load_checkpoint(path)
    eval_loss = trainer.evaluate(eval_dataset)
    assert eval_loss > 0
    # beyond the seed: the load really restores (weights and position)
    saved = {k: v.copy() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.data[...] = 0
    trainer.step = 0
    trainer.load_checkpoint(path)
    assert trainer.step == 5 and trainer.losses == losses
    assert all(np.array_equal(v, saved[k]) for k, v in model.state_dict().items())


def test_full_finetuning_updates_every_parameter_and_evaluate_touches_nothing(task_data):
    records, tok = task_data
    ds = FinetuneDataset(records, tok, max_length=64)
    model = _tiny_model(tok)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    trainer = Trainer(model, AdamW(model.parameters(), lr=1e-3), ds, batch_size=4, epochs=1, progress=False)
    trainer.train()
    assert all(not np.array_equal(v, before[k]) for k, v in model.state_dict().items())
    after = {k: v.copy() for k, v in model.state_dict().items()}
    loss = trainer.evaluate(ds)
    assert math.isfinite(loss) and loss > 0
    assert all(np.array_equal(v, after[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_schedule_warms_up_then_decays(task_data):
    records, tok = task_data
    ds = FinetuneDataset(records, tok, max_length=64)
    model = _tiny_model(tok)
    opt = SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, opt, ds, batch_size=2, epochs=2, warmup_ratio=0.25, min_lr_ratio=0.1, progress=False)
    lrs = []
    original = opt.step

    def recording_step(*a, **k):
        lrs.append(opt.param_groups[0]["lr"])
        return original(*a, **k)

    opt.step = recording_step
    trainer.train()
    assert trainer.total_steps == 24 and len(lrs) == 24
    peak = int(np.argmax(lrs))
    assert peak == 6 and lrs[peak] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert lrs[-1] >= 0.01 - 1e-12


def test_grad_accumulation_equals_one_big_batch(task_data):
    records, tok = task_data
    ds = FinetuneDataset(records[:8], tok, max_length=64)

    def run(batch_size, accum):
        model = _tiny_model(tok, seed=1)
        t = Trainer(model, SGD(model.parameters(), lr=0.05), ds, batch_size=batch_size, epochs=1,
                    grad_accum_steps=accum, progress=False, warmup_ratio=0.0, max_grad_norm=None)
        t.loader.shuffle = False  # same order for both runs
        losses = t.train()
        return losses, model.state_dict()

    big_losses, big = run(8, 1)
    small_losses, small = run(2, 4)
    assert len(big_losses) == len(small_losses) == 1
    assert small_losses[0] == pytest.approx(big_losses[0], rel=1e-5)
    for k in big:
        np.testing.assert_allclose(small[k], big[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_interrupted_and_resumed_run_gives_exactly_the_same_losses(task_data, tmp_path):
    records, tok = task_data
    ds = FinetuneDataset(records, tok, max_length=64)

    def fresh():
        model = fl.GPT(vocab_size=tok.vocab_size, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=64,
                       seed=3, dropout=0.1)  # dropout: the RNG state must be restored too
        return Trainer(model, AdamW(model.parameters(), lr=3e-3), ds, batch_size=4, epochs=3,
                       grad_accum_steps=2, seed=7, progress=False)

    full = fresh().train()

    first = fresh()
    first.total_steps = 5  # stop part-way through the second epoch
    first.train()
    path = tmp_path / "ckpt.safetensors"
    first.save_checkpoint(path)
    resumed = fresh()
    resumed.load_checkpoint(path)
    assert resumed.step == 5
    assert resumed.train() == full


def _dropout_trainer(tok, ds, **kw):
    model = fl.GPT(vocab_size=tok.vocab_size, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=64,
                   seed=3, dropout=0.1)  # dropout: its RNG draws of the interrupted step are put back
    return Trainer(model, AdamW(model.parameters(), lr=3e-3), ds, batch_size=4, epochs=3, grad_accum_steps=2,
                   seed=7, progress=False, **kw)


def test_ctrl_c_in_the_middle_of_a_step_saves_a_checkpoint_that_redoes_it(task_data, tmp_path, monkeypatch):
    import fastlora.train.trainer as trainer_module
    records, tok = task_data
    ds = FinetuneDataset(records, tok, max_length=64)
    full = _dropout_trainer(tok, ds)
    full_losses = full.train()

    calls = []
    real_loss = trainer_module.causal_lm_loss

    def ctrl_c_in_step_4(*args):  # the second micro-batch of step 4 (after its forward and dropout)
        calls.append(1)
        loss = real_loss(*args)
        if len(calls) == 2 * 4 + 2:
            raise KeyboardInterrupt
        return loss

    monkeypatch.setattr(trainer_module, "causal_lm_loss", ctrl_c_in_step_4)
    cut = _dropout_trainer(tok, ds, checkpoint_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cut.train()
    monkeypatch.setattr(trainer_module, "causal_lm_loss", real_loss)
    assert cut.step == 4 and len(cut.losses) == 4

    resumed = _dropout_trainer(tok, ds)
    resumed.load_checkpoint(cut.last_checkpoint)
    assert resumed.train() == full_losses
    for name, value in full.model.state_dict().items():
        np.testing.assert_array_equal(resumed.model.state_dict()[name], value, err_msg=name)


def test_ctrl_c_during_the_update_is_held_until_the_step_is_whole(task_data, tmp_path):
    import signal
    records, tok = task_data
    ds = FinetuneDataset(records, tok, max_length=64)
    full_losses = _dropout_trainer(tok, ds).train()

    cut = _dropout_trainer(tok, ds, checkpoint_dir=tmp_path)
    real_step = cut.optimizer.step

    def step_with_ctrl_c():
        if cut.step == 3:
            signal.raise_signal(signal.SIGINT)  # arrives before the first weight is touched
        real_step()

    cut.optimizer.step = step_with_ctrl_c
    # Python's own handler, as a program started in a terminal has (one started in the background
    # by a non-interactive shell inherits SIGINT ignored: the next test)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            cut.train()
        assert cut.step == 4  # step 3 was applied in full, then the Ctrl-C was raised
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    resumed = _dropout_trainer(tok, ds)
    resumed.load_checkpoint(cut.last_checkpoint)
    assert resumed.train() == full_losses


def test_ctrl_c_in_a_process_that_ignores_it_stays_ignored(task_data):
    """A held Ctrl-C is given to the handler that was there before: when that is SIG_IGN (a
    background job of a non-interactive shell), training goes on as if none had come."""
    import signal
    records, tok = task_data
    ds = FinetuneDataset(records, tok, max_length=64)
    full_losses = _dropout_trainer(tok, ds).train()
    cut = _dropout_trainer(tok, ds)
    real_step = cut.optimizer.step

    def step_with_ctrl_c():
        if cut.step == 3:
            signal.raise_signal(signal.SIGINT)
        real_step()

    cut.optimizer.step = step_with_ctrl_c
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert cut.train() == full_losses
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_non_finite_steps_are_skipped_then_training_stops(task_data, tmp_path):
    records, tok = task_data
    ds = FinetuneDataset(records, tok, max_length=64)
    model = _tiny_model(tok)
    trainer = Trainer(model, SGD(model.parameters(), lr=0.01), ds, batch_size=4, epochs=3, progress=False,
                      max_bad_steps=3)
    trainer.total_steps = 2
    trainer.train()
    good = tmp_path / "good.safetensors"
    trainer.save_checkpoint(good)
    saved = good.read_bytes()
    weights = {k: v.copy() for k, v in model.state_dict().items()}
    model.blocks[0].mlp.fc1.weight.data[0, 0] = np.nan  # poison: every later loss is NaN
    trainer.total_steps = 10
    with pytest.warns(RuntimeWarning, match="not finite"), pytest.raises(TrainingDiverged, match="3 steps in a row"):
        trainer.train()
    assert trainer.skipped_steps == [2, 3, 4]
    for k, v in model.state_dict().items():  # skipped steps never touch the weights
        if k != "blocks.0.mlp.fc1.weight":
            np.testing.assert_array_equal(v, weights[k])
    assert good.read_bytes() == saved


def test_checkpoint_for_another_model_shape_is_refused_and_changes_nothing(task_data, tmp_path):
    records, tok = task_data
    ds = FinetuneDataset(records, tok, max_length=64)
    small = _tiny_model(tok)
    t1 = Trainer(small, SGD(small.parameters(), lr=0.01), ds, batch_size=4, progress=False)
    path = tmp_path / "c.safetensors"
    t1.save_checkpoint(path)
    wide = fl.GPT(vocab_size=tok.vocab_size, embed_dim=48, num_heads=4, num_layers=2, max_seq_len=64)
    t2 = Trainer(wide, SGD(wide.parameters(), lr=0.01), ds, batch_size=4, progress=False)
    before = {k: v.copy() for k, v in wide.state_dict().items()}
    with pytest.raises(ValueError, match=r"'embed.weight' has shape \(\d+, 32\) in the checkpoint but \(\d+, 48\)"):
        t2.load_checkpoint(path)
    assert all(np.array_equal(v, before[k]) for k, v in wide.state_dict().items())


def test_checkpoint_in_another_dtype_is_refused_and_changes_nothing(task_data, tmp_path):
    records, tok = task_data
    ds = FinetuneDataset(records, tok, max_length=64)
    single = _tiny_model(tok)
    path = tmp_path / "c.safetensors"
    Trainer(single, SGD(single.parameters(), lr=0.01), ds, batch_size=4, progress=False).save_checkpoint(path)
    double = fl.GPT(vocab_size=tok.vocab_size, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=64,
                    dtype=np.float64)
    t2 = Trainer(double, SGD(double.parameters(), lr=0.01), ds, batch_size=4, progress=False)
    before = {k: v.copy() for k, v in double.state_dict().items()}
    with pytest.raises(ValueError, match=r"'embed.weight' is float32 in the checkpoint but float64 in the model"):
        t2.load_checkpoint(path)
    assert all(np.array_equal(v, before[k]) for k, v in double.state_dict().items())


def test_corrupt_truncated_and_pickled_checkpoints_are_refused(task_data, tmp_path):
    records, tok = task_data
    ds = FinetuneDataset(records, tok, max_length=64)
    model = _tiny_model(tok)
    trainer = Trainer(model, AdamW(model.parameters(), lr=1e-3), ds, batch_size=4, progress=False)
    trainer.total_steps = 1
    trainer.train()
    path = tmp_path / "c.safetensors"
    trainer.save_checkpoint(path)
    blob = path.read_bytes()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    step = trainer.step

    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="not a valid checkpoint"):
        trainer.load_checkpoint(truncated)
    pickled = tmp_path / "p.pt"
    pickled.write_bytes(pickle.dumps({"weights": 1}))
    with pytest.raises(ValueError, match="never unpickles"):
        trainer.load_checkpoint(pickled)
    model.save(tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="not a fastlora checkpoint"):
        trainer.load_checkpoint(tmp_path / "weights.safetensors")
    with pytest.raises(FileNotFoundError):
        trainer.load_checkpoint(tmp_path / "missing.safetensors")
    assert trainer.step == step
    assert all(np.array_equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_arguments_are_named(task_data):
    records, tok = task_data
    ds = FinetuneDataset(records, tok, max_length=64)
    model = _tiny_model(tok)
    opt = SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        Trainer(model, opt, ds, batch_size=0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        Trainer(model, opt, ds, warmup_ratio=1.5)
    long_ds = FinetuneDataset(records, tok, max_length=128)
    short_model = fl.GPT(vocab_size=tok.vocab_size, embed_dim=32, num_heads=4, num_layers=1, max_seq_len=16)
    with pytest.raises(ValueError, match=r"dataset\[0\] has \d+ tokens, more than the model's max_seq_len=16"):
        Trainer(short_model, SGD(short_model.parameters(), lr=0.1), long_ds)


def test_resuming_with_another_seed_or_accumulation_is_refused(task_data, tmp_path):
    records, tok = task_data
    ds = FinetuneDataset(records, tok, max_length=64)
    model = _tiny_model(tok)
    t = Trainer(model, SGD(model.parameters(), lr=0.01), ds, batch_size=4, seed=1, progress=False)
    path = tmp_path / "c.safetensors"
    t.save_checkpoint(path)
    other = Trainer(model, SGD(model.parameters(), lr=0.01), ds, batch_size=4, seed=2, grad_accum_steps=2,
                    progress=False)
    with pytest.raises(ValueError, match=r"seed 1 \(this trainer: 2\), grad_accum_steps 1 \(this trainer: 2\)"):
        other.load_checkpoint(path)
