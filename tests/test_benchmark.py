"""Seed level 4 (train both ways, merge, compare) and the Benchmark's metrics."""
import math

import numpy as np
import pytest

import fastlora as fl
from fastlora.data import BPETokenizer, FinetuneDataset, InstructionFormatter
from fastlora.eval import Benchmark, format_table, train_full_finetune, train_lora, train_qlora
from fastlora.lora import LoRAMerger
from fastlora.tasks import make_examples


@pytest.fixture(scope="module")
def setup():
    records = make_examples(40, seed=0)
    fmt = InstructionFormatter()
    tok = BPETokenizer.train([fmt.format(r["instruction"], r["input"], r["output"]) for r in records],
                             vocab_size=100)
    dataset = FinetuneDataset(records[:32], tok, max_length=64)
    eval_data = FinetuneDataset(records[32:], tok, max_length=64)
    base_model = fl.GPT(vocab_size=100, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=64, seed=0)
    return base_model, dataset, eval_data


def test_seed_level_4_as_written(setup):
    base_model, dataset, eval_data = setup
    before = {k: v.copy() for k, v in base_model.state_dict().items()}
    model_full = train_full_finetune(base_model, dataset, epochs=3, batch_size=4)
    model_lora = train_lora(base_model, dataset, rank=4, epochs=3, batch_size=4)
    for k, v in base_model.state_dict().items():  # the base is never modified
        np.testing.assert_array_equal(v, before[k])

    merger = LoRAMerger()
    merger.merge(model_lora)

    bench = Benchmark(eval_dataset=eval_data)
    results = bench.compare({
        "base": base_model,
        "full_finetune": model_full,
        "lora_rank4": model_lora,
    })
    assert results["lora_rank4"]["loss"] < results["base"]["loss"]
    assert results["lora_rank4"]["trainable_params"] < results["full_finetune"]["trainable_params"] * 0.1
    for r in results.values():
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["exact_match"] <= 1.0
        assert r["total_params"] >= r["trainable_params"] > 0
    for name in ("full_finetune", "lora_rank4"):
        assert results[name]["training_time_s"] > 0 and results[name]["peak_memory_mb"] > 0
        assert len(results[name]["train_losses"]) == 24
    assert "training_time_s" not in results["base"]
    assert results["full_finetune"]["trainable_params"] == results["full_finetune"]["total_params"]
    table = format_table(results)
    assert "lora_rank4" in table and "perplexity" in table


def test_qlora_is_trained_on_a_copy_and_counted_with_its_nf4_weights(setup):
    base_model, dataset, eval_data = setup
    before = {k: v.copy() for k, v in base_model.state_dict().items()}
    qlora = train_qlora(base_model, dataset, rank=4, epochs=2, batch_size=4, lr=1e-2)
    lora = train_lora(base_model, dataset, rank=4, target_modules=("q_proj", "k_proj", "v_proj", "out_proj",
                                                                     "fc1", "fc2"), epochs=1, batch_size=4)
    for k, v in base_model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    assert len(qlora.quantized_weights()) == 12  # six linears in each of two blocks
    results = Benchmark(eval_dataset=eval_data, exact_match_limit=0).compare(
        {"base": base_model, "qlora": qlora, "lora": lora})
    q, lo = results["qlora"], results["lora"]
    # the NF4 weights count as weights, as in trainable_percentage(): the same counts as LoRA's
    assert (q["trainable_params"], q["total_params"]) == (lo["trainable_params"], lo["total_params"])
    assert lo["total_params"] == results["base"]["total_params"] + lo["trainable_params"]
    assert 100.0 * q["trainable_params"] / q["total_params"] == pytest.approx(qlora.trainable_percentage())
    assert q["loss"] < results["base"]["loss"] and len(q["train_losses"]) == 16
    # stored weights: the float base, plus adapters for LoRA; QLoRA's linears in about 4 bits
    assert results["base"]["weights_mb"] * 2 ** 20 == sum(p.data.nbytes for p in base_model.parameters())
    assert lo["weights_mb"] * 2 ** 20 == results["base"]["weights_mb"] * 2 ** 20 + 4 * lo["trainable_params"]
    nf4_bytes = sum(w.nbytes for _, w in qlora.quantized_weights())
    assert 0.5 * sum(w.size for _, w in qlora.quantized_weights()) < nf4_bytes
    assert q["weights_mb"] * 2 ** 20 == sum(p.data.nbytes for p in qlora.parameters()) + nf4_bytes
    assert q["weights_mb"] < 0.6 * lo["weights_mb"]


def test_accuracy_counts_argmax_hits_on_response_tokens_only(setup):
    _, _, eval_data = setup

    class Oracle:
        """Puts all mass on the true next token: accuracy 1, loss ~0."""
        training = False

        def __init__(self, ds, vocab):
            self.ds, self.vocab = ds, vocab

        def __call__(self, ids):
            ids = np.asarray(ids)
            logits = np.full(ids.shape + (self.vocab,), -30.0, dtype=np.float32)
            for b in range(ids.shape[0]):
                row = ids[b]
                for t in range(len(row) - 1):
                    logits[b, t, row[t + 1]] = 30.0
            return fl.Tensor(logits)

        def eval(self):
            return self

        def train(self, mode=True):
            return self

        def parameters(self):
            return iter([fl.nn.Parameter(np.zeros(3, np.float32))])

    bench = Benchmark(eval_dataset=eval_data)
    loss, accuracy, tokens = bench._loss_and_accuracy(Oracle(eval_data, 100))
    assert accuracy == 1.0 and loss < 1e-6
    assert tokens == sum(int((np.array(eval_data[i]["labels"][1:]) != -100).sum()) for i in range(len(eval_data)))


def test_exact_match_generates_the_reference(setup):
    _, dataset, eval_data = setup
    # a model trained hard on the eval records themselves must reproduce some of them exactly
    model = fl.GPT(vocab_size=100, embed_dim=48, num_heads=4, num_layers=2, max_seq_len=64, seed=1)
    trained = train_full_finetune(model, eval_data, epochs=60, batch_size=8, lr=3e-3)
    result = Benchmark(eval_dataset=eval_data).evaluate(trained)
    assert result["exact_match"] >= 0.5
    assert Benchmark(eval_dataset=eval_data).evaluate(model)["exact_match"] == 0.0


def test_bad_arguments(setup):
    base_model, _, eval_data = setup
    with pytest.raises(ValueError, match="eval_dataset is required"):
        Benchmark(base_model)
    with pytest.raises(ValueError, match="needs a model"):
        Benchmark(eval_dataset=eval_data).evaluate()
    with pytest.raises(ValueError, match="non-empty dict"):
        Benchmark(eval_dataset=eval_data).compare({})
    with pytest.raises(ValueError, match="exact_match_limit must be an int >= 0"):
        Benchmark(eval_dataset=eval_data, exact_match_limit=-1)
