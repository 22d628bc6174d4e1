"""Packing: several records in one row, positions restarting per record, attention kept within
each record; the same logits, losses and gradients as the records one by one."""
import numpy as np
import pytest

import fastlora as fl
from fastlora.lora import LoRAModel

RNG = np.random.default_rng(0)
RECORDS = [RNG.integers(0, 40, size=n) for n in (5, 9, 3, 7)]


def _gpt():
    return fl.GPT(vocab_size=40, embed_dim=16, num_heads=2, num_layers=2, max_seq_len=32, seed=0, dtype=np.float64)


def _llama():
    return fl.Llama(vocab_size=40, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2,
                    max_seq_len=32, dtype=np.float64)


def _lora():
    model = LoRAModel(_gpt(), target_modules=["q_proj", "v_proj"], rank=2)
    model.inject_lora()
    for p in model.lora_parameters():  # B starts at zero: make the adapters count
        p.data[...] = RNG.normal(size=p.shape) * 0.1
    return model


MODELS = {"gpt": _gpt, "llama": _llama, "lora": _lora}


def _packed(records, T=26):
    """Two rows of records, padded at the end: (ids, position_ids, labels) as the dataset packs them."""
    ids, pos, labels = np.zeros((2, T), np.int64), np.zeros((2, T), np.int64), np.full((2, T), -100)
    rows = [records[:2], records[2:]]
    for b, row in enumerate(rows):
        o = 0
        for r in row:
            ids[b, o:o + len(r)], pos[b, o:o + len(r)] = r, np.arange(len(r))
            labels[b, o + 1:o + len(r)] = r[1:]  # a record's first token is never a target
            o += len(r)
        pos[b, o:] = np.arange(T - o)  # padding: a record of its own, never scored
    return ids, pos, labels


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_of_each_record_are_those_of_the_record_alone(name):
    model = MODELS[name]()
    ids, pos, _ = _packed(RECORDS)
    logits = model(ids, position_ids=pos).data
    rows = [RECORDS[:2], RECORDS[2:]]
    for b, row in enumerate(rows):
        o = 0
        for r in row:
            np.testing.assert_allclose(logits[b, o:o + len(r)], model(r[None]).data[0], rtol=0, atol=1e-12)
            o += len(r)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_packed_loss_and_gradients_are_the_records_summed(name, checkpointing):
    model = MODELS[name]()
    if checkpointing:
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]

    def total(ids, labels, **kw):  # summed loss over scored tokens, and its gradients
        for p in params:
            p.grad = None
        n = int((labels[:, 1:] != -100).sum())
        loss = model.loss(ids, labels, **kw)
        (loss * float(n)).backward()
        return float(loss.data) * n, [p.grad.copy() for p in params]

    ids, pos, labels = _packed(RECORDS)
    packed_loss, packed_grads = total(ids, labels, position_ids=pos)
    alone = [total(r[None], r[None]) for r in RECORDS]
    assert packed_loss == pytest.approx(sum(a[0] for a in alone), rel=1e-12)
    for i, g in enumerate(packed_grads):
        np.testing.assert_allclose(g, sum(a[1][i] for a in alone), rtol=1e-9, atol=1e-12)


def test_token_scores_and_a_model_without_position_ids():
    from fastlora.nn.causal_lm import causal_lm_loss, token_scores
    model = _gpt()
    ids, pos, labels = _packed(RECORDS)
    loss, n, _ = token_scores(model, ids, labels, position_ids=pos)
    separate = [token_scores(model, r[None], r[None]) for r in RECORDS]
    assert n == sum(s[1] for s in separate) and loss == pytest.approx(sum(s[0] for s in separate), rel=1e-12)

    class Plain(fl.nn.Module):
        def forward(self, input_ids):
            return model(input_ids)

    with pytest.raises(TypeError, match="packed rows need a model whose forward takes position_ids"):
        causal_lm_loss(Plain(), ids, labels, position_ids=pos)


# --- the dataset, the trainer and the benchmark -----------------------------------------------------

def _data():
    from fastlora.tasks import make_examples
    return make_examples(40, seed=2)


@pytest.fixture(scope="module")
def tok():
    from fastlora.data import BPETokenizer, InstructionFormatter
    fmt = InstructionFormatter()
    return BPETokenizer.train([fmt.format(r["instruction"], r["input"], r["output"]) for r in _data()], vocab_size=200)


def test_best_fit_decreasing_places_every_example_once_within_capacity():
    from fastlora.data.packing import best_fit_decreasing
    lengths = np.random.default_rng(1).integers(1, 50, size=300)
    rows, members = best_fit_decreasing(lengths, 64)
    assert sorted(members.tolist()) == list(range(300))
    sums = np.add.reduceat(lengths[members], rows[:-1])
    assert sums.max() <= 64 and len(sums) <= int(np.ceil(lengths.sum() / 64)) + 6  # little room wasted
    with pytest.raises(ValueError, match="1 to 64 tokens"):
        best_fit_decreasing([65], 64)


def test_packed_items_hold_each_example_with_its_own_positions(tok):
    plain = fl.FinetuneDataset(_data(), tok, max_length=128)
    packed = fl.FinetuneDataset(_data(), tok, max_length=128, packing=True)
    assert len(packed) < len(plain) / 2 and packed.lengths.max() <= 128 and packed.lengths.sum() == plain.lengths.sum()
    seen = []
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            item = next(j for j in range(len(plain)) if plain[j]["input_ids"] == row["input_ids"][a:b]
                        and j not in seen)
            seen.append(item)
            assert row["labels"][a] == -100 and row["labels"][a + 1:b] == plain[item]["labels"][1:]
    assert sorted(seen) == list(range(len(plain)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_evaluate_and_benchmark_give_the_unpacked_loss(tok, dtype):
    model = fl.GPT(vocab_size=200, embed_dim=16, num_heads=2, num_layers=2, max_seq_len=128, seed=0, dtype=dtype)
    plain = fl.FinetuneDataset(_data(), tok, max_length=128)
    packed = fl.FinetuneDataset(_data(), tok, max_length=128, packing=True)
    trainer = fl.Trainer(model, fl.SGD(model.parameters(), lr=0.01), plain, batch_size=4, epochs=1)
    assert trainer.evaluate(packed) == pytest.approx(trainer.evaluate(plain), abs=1e-5)
    a, b = (fl.Benchmark(eval_dataset=ds, exact_match_limit=0).evaluate(model) for ds in (plain, packed))
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["eval_tokens"] == a["eval_tokens"]
    assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-9)


def test_training_on_packed_rows(tok):
    model = fl.GPT(vocab_size=200, embed_dim=16, num_heads=2, num_layers=2, max_seq_len=128, seed=0)
    packed = fl.FinetuneDataset(_data(), tok, max_length=128, packing=True)
    losses = fl.Trainer(model, fl.AdamW(model.parameters(), lr=3e-3), packed, batch_size=2, epochs=3).train()
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_packing_never_cuts_a_record_under_drop(tok):
    data = _data()
    data[7] = dict(data[7], output="7 " * 150)
    with pytest.raises(ValueError, match=r"data: record 7 is longer than max_length=128 tokens, and packing with "
                                         r"truncation='drop' never cuts a record"):
        fl.FinetuneDataset(data, tok, max_length=128, packing=True, truncation="drop")
    assert len(fl.FinetuneDataset(data, tok, max_length=128, packing=True).example_lengths) == len(data)
