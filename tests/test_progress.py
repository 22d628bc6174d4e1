"""Progress and logging: log lines where no terminal watches, the end-of-train summary in
transformers' terms, fl.set_verbosity, the evaluation's progress, and the tables they feed."""
import math

import pytest

import fastlora as fl
from fastlora import progress
from fastlora.data import BPETokenizer, FinetuneDataset, InstructionFormatter
from fastlora.tasks import make_examples


@pytest.fixture(scope="module")
def data():
    records = make_examples(24, seed=0)
    fmt = InstructionFormatter()
    tok = BPETokenizer.train([fmt.format(r["instruction"], r["input"], r["output"]) for r in records],
                             vocab_size=200)
    return FinetuneDataset(records[:16], tok, max_length=64), FinetuneDataset(records[16:], tok, max_length=64)


@pytest.fixture
def verbosity():
    level = fl.get_verbosity()
    yield
    fl.set_verbosity(level)


def _trainer(data, **kw):
    train, evals = data
    model = fl.GPT(vocab_size=train.tokenizer.vocab_size, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=64)
    return fl.Trainer(model, fl.AdamW(model.parameters(), lr=1e-3), train, batch_size=4, epochs=2,
                      eval_dataset=evals, **kw)


def test_log_lines_and_summary_when_no_terminal_watches(data, capsys, verbosity):
    fl.set_verbosity("info")
    trainer = _trainer(data, logging_steps=3, eval_every=4, run_name="tiny")
    losses = trainer.train()
    err = capsys.readouterr().err  # pytest's captured stderr is not a terminal
    lines = [line for line in err.splitlines() if line.startswith("fastlora: train tiny: step")]
    assert [line.split()[4] for line in lines] == ["3/8", "6/8", "8/8"]  # every 3 steps, and the last
    for word in ("loss", "lr", "tokens/s", "elapsed", "ETA"):
        assert word in lines[0]
    metrics = trainer.metrics
    assert metrics["global_step"] == 8 and metrics["epoch"] == 2.0
    assert metrics["train_loss"] == pytest.approx(sum(losses) / len(losses))
    assert metrics["train_runtime"] > 0 and metrics["train_tokens_per_second"] > 0
    assert metrics["best_eval_loss"] == min(loss for _, loss in trainer.eval_losses)
    assert "fastlora: train tiny done: train_runtime" in err
    block = progress.format_metrics(metrics)
    assert block.splitlines()[0] == "***** train metrics *****" and "best_eval_loss" in block


def test_set_verbosity_silences_and_progress_false_says_nothing(data, capsys, verbosity):
    fl.set_verbosity("warning")
    _trainer(data, logging_steps=1).train()
    assert "fastlora:" not in capsys.readouterr().err
    fl.set_verbosity("info")
    trainer = _trainer(data, progress=False)
    trainer.train()
    assert capsys.readouterr().err == "" and trainer.metrics["global_step"] == 8
    with pytest.raises(ValueError, match="must be one of debug, info"):
        fl.set_verbosity("loud")


def test_evaluation_progress_is_logged(data, capsys, verbosity):
    fl.set_verbosity("info")
    train, evals = data
    model = fl.GPT(vocab_size=train.tokenizer.vocab_size, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=64)
    result = fl.Benchmark(eval_dataset=evals, progress=True, exact_match_limit=2).evaluate(model, "tiny")
    err = capsys.readouterr().err
    assert "fastlora: eval tiny: loss: 1 batches in" in err and "eval tiny: exact match: 2 records in" in err
    assert math.isfinite(result["loss"])


def test_format_table_leaves_out_columns_no_model_has(data):
    train, evals = data
    model = fl.GPT(vocab_size=train.tokenizer.vocab_size, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=64)
    loaded = fl.Benchmark(eval_dataset=evals, exact_match_limit=0).evaluate(model)
    header = fl.format_table({"loaded": loaded}).splitlines()[0].split()
    assert "training_time_s" not in header and "peak_memory_mb" not in header and "loss" in header
    trained = dict(loaded, training_time_s=1.5, peak_memory_mb=None)
    header = fl.format_table({"loaded": loaded, "trained": trained}).splitlines()[0].split()
    assert "training_time_s" in header and "peak_memory_mb" not in header


def test_clock():
    assert [progress.clock(s) for s in (0, 59.6, 61, 3723, float("nan"), None)] == \
        ["0:00", "1:00", "1:01", "1:02:03", "?", "?"]
