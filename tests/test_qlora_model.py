"""QLoRA models: training changes only A and B, the Trainer's loss falls, adapter files round-trip
(and are plain LoRA files), several adapters, merging warns and stays close, merge_and_unload."""
import warnings

import numpy as np
import pytest

import fastlora as fl
from fastlora.data import BPETokenizer, FinetuneDataset, InstructionFormatter
from fastlora.lora import LoRAModel
from fastlora.lora.qlora import QLoRALinear, QLoRAModel, apply_qlora, get_qlora_parameters
from fastlora.optim import AdamW
from fastlora.tasks import make_examples
from fastlora.train import Trainer


def _gpt(vocab=97, seed=0, D=64):
    return fl.GPT(vocab_size=vocab, embed_dim=D, num_heads=4, num_layers=2, max_seq_len=64, seed=seed)


def _ids(seed=0, shape=(2, 12)):
    return np.random.default_rng(seed).integers(0, 97, shape)


def _nf4_state(lm):
    """Copies of every stored NF4 array, by layer path."""
    return {p: {k: v.copy() for k, v in w.quantized.to_arrays()[0].items()} for p, w in lm.quantized_weights()}


def _assert_same_nf4(lm, before):
    after = _nf4_state(lm)
    assert after.keys() == before.keys()
    for p in before:
        for k in before[p]:
            np.testing.assert_array_equal(after[p][k], before[p][k], err_msg=f"{p} {k}")


def test_training_changes_only_A_and_B():
    lm = apply_qlora(_gpt(), rank=4, alpha=8.0, dropout=0.1)
    frozen = {n: p.data.copy() for n, p in lm.named_parameters() if not p.requires_grad}
    nf4 = _nf4_state(lm)
    params = get_qlora_parameters(lm)
    start = [p.data.copy() for p in params]
    opt = AdamW(params, lr=1e-2)
    ids = _ids(shape=(4, 16))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = fl.cross_entropy(lm(ids), ids)
        loss.backward()
        opt.step()
        losses.append(float(loss.data))
    assert losses[-1] < losses[0]
    for n, p in lm.named_parameters():
        if n in frozen:
            np.testing.assert_array_equal(p.data, frozen[n], err_msg=n)
            assert p.grad is None, n  # frozen base parameters get no gradient at all
    _assert_same_nf4(lm, nf4)
    assert all(not np.array_equal(p.data, s) for p, s in zip(params, start))
    assert {n.split(".")[-2] for n, p in lm.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


@pytest.fixture(scope="module")
def task_data():
    records = make_examples(24, seed=0)
    fmt = InstructionFormatter()
    tok = BPETokenizer.train([fmt.format(r["instruction"], r["input"], r["output"]) for r in records],
                             vocab_size=200)
    return FinetuneDataset(records, tok, max_length=64), tok


def test_the_trainer_trains_it_on_the_bundled_model_and_the_loss_falls():
    from fastlora.demo import prepare
    base, _, train_ds, eval_ds = prepare(max_train=32, max_eval=16)
    lm = apply_qlora(base.copy(), rank=8, alpha=16.0)
    nf4 = _nf4_state(lm)
    trainer = Trainer(lm, AdamW(get_qlora_parameters(lm), lr=4e-3), train_ds, batch_size=4, max_steps=6,
                      warmup_ratio=0.0, progress=False)
    before = trainer.evaluate(eval_ds)
    losses = trainer.train()
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]
    assert trainer.evaluate(eval_ds) < 0.8 * before
    _assert_same_nf4(lm, nf4)


def test_trainer_checkpoints_resume_into_a_fresh_qlora_model(task_data, tmp_path):
    dataset, tok = task_data
    lm = apply_qlora(_gpt(tok.vocab_size), rank=8, alpha=16.0)
    trainer = Trainer(lm, AdamW(get_qlora_parameters(lm), lr=1e-2), dataset, batch_size=8, epochs=2,
                      progress=False, checkpoint_dir=tmp_path)
    trainer.train()
    # a checkpoint holds the float parameters (adapters included); the NF4 weights are rebuilt
    # from the same base by quantizing it again, which is deterministic
    again = apply_qlora(_gpt(tok.vocab_size), rank=8, alpha=16.0)
    resumed = Trainer(again, AdamW(get_qlora_parameters(again), lr=1e-2), dataset, batch_size=8, epochs=2,
                      progress=False)
    resumed.load_checkpoint(trainer.last_checkpoint)
    np.testing.assert_array_equal(again(_ids()).data, lm(_ids()).data)


def _trained(lm, seed=0):
    rng = np.random.default_rng(seed)
    for p in lm.lora_parameters():
        p.data[...] = rng.normal(0.0, 0.05, p.shape)
    return lm


def test_adapter_files_round_trip_and_are_plain_lora_files(tmp_path):
    base = _gpt()
    lm = _trained(apply_qlora(base.copy(), rank=4, alpha=8.0))
    ids = _ids()
    expected = lm(ids).data
    lm.save_adapter(tmp_path / "a")
    lm.save_pretrained(tmp_path / "all")
    again = apply_qlora(base.copy(), rank=4, alpha=8.0)
    assert not np.allclose(again(ids).data, expected)
    again.load_adapter(tmp_path / "a")
    np.testing.assert_array_equal(again(ids).data, expected)
    loaded = QLoRAModel.from_pretrained(base.copy(), tmp_path / "all")
    assert isinstance(loaded, QLoRAModel) and loaded.quantized_weights()
    np.testing.assert_array_equal(loaded(ids).data, expected)
    # the same files load into a float LoRA model: only the base weights' rounding differs
    plain = LoRAModel.from_pretrained(base.copy(), tmp_path / "a")
    for a, b in zip(plain.lora_parameters(), lm.lora_parameters()):
        np.testing.assert_array_equal(a.data, b.data)
    assert np.abs(plain(ids).data - expected).max() < 0.1 * np.abs(expected).max()


def test_several_adapters():
    lm = _trained(apply_qlora(_gpt(), rank=4, alpha=8.0))
    ids = _ids()
    first = lm(ids).data
    nf4 = _nf4_state(lm)
    lm.add_adapter("other", rank=2, alpha=2.0, target_modules=["fc1", "fc2"])
    assert lm(ids).data.tolist() == first.tolist()  # added, not active
    lm.set_adapter("other")
    with lm.disable_adapter():
        base = lm(ids).data
    np.testing.assert_allclose(lm(ids).data, base, rtol=1e-6, atol=1e-6)  # fresh B is zero
    _trained(lm, seed=1)
    assert not np.allclose(lm(ids).data, base, atol=1e-4)
    assert all("other" in n for n, p in lm.named_parameters() if p.requires_grad)
    lm.set_adapter("default")
    np.testing.assert_array_equal(lm(ids).data, first)
    lm.delete_adapter("other")
    assert lm.adapters == ["default"]
    _assert_same_nf4(lm, nf4)  # one quantized weight per layer, shared by every adapter


def test_a_second_adapter_on_new_layers_quantizes_them():
    lm = apply_qlora(_gpt(), rank=2, target_modules=["q_proj"])
    assert len(lm.quantized_weights()) == 2
    lm.add_adapter("mlp", rank=2, target_modules=["fc1"])
    assert sorted({p.rsplit(".", 1)[-1] for p, _ in lm.quantized_weights()}) == ["fc1", "q_proj"]
    assert isinstance(lm.get_submodule("blocks.0.mlp.fc1"), QLoRALinear)


def _rms(a):
    return float(np.sqrt(np.mean(np.square(a))))


@pytest.mark.parametrize("seed", [0, 1])
def test_merge_warns_stays_close_and_unmerge_restores_exactly(seed):
    base = _gpt(seed=seed)
    lm = _trained(apply_qlora(base.copy(), rank=4, alpha=8.0), seed)
    ids = _ids()
    unmerged = lm(ids).data
    # the same adapter on the float base: how far the first rounding (quantizing W) moved the outputs
    float_twin = LoRAModel(base.copy(), ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], rank=4,
                           alpha=8.0).inject_lora()
    for a, b in zip(float_twin.lora_parameters(), lm.lora_parameters()):
        a.data[...] = b.data
    first_rounding = _rms(float_twin(ids).data - unmerged)
    nf4 = _nf4_state(lm)
    with pytest.warns(UserWarning, match="requantizes"):
        lm.merge_adapter()
    assert lm.merged
    merged = lm(ids).data
    assert not np.array_equal(merged, unmerged)  # the requantization rounds a second time ...
    assert _rms(merged - unmerged) < 2 * first_rounding  # ... and moves the outputs about as much as the first
    layer = lm.get_submodule("blocks.0.attn.q_proj")
    w = layer.weight.dequantize()
    exact = layer._unmerged_weight.dequantize() + layer.delta_weight()
    step = np.abs(exact).max() / 7  # the widest gap between NF4 codes is under 1/7 of the absmax
    assert np.abs(w - exact).max() < step
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unmerge puts the kept NF4 weight back: nothing to warn about
        lm.unmerge_adapter()
    np.testing.assert_array_equal(lm(ids).data, unmerged)
    _assert_same_nf4(lm, nf4)
    with pytest.raises(ValueError, match="nothing is merged"):
        lm.unmerge_adapter()


def test_merge_and_unload_gives_a_float_gpt_without_a_second_rounding():
    lm = _trained(apply_qlora(_gpt(), rank=4, alpha=8.0))
    ids = _ids()
    expected = lm(ids).data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpt = lm.merge_and_unload()
    assert type(gpt) is fl.GPT and not any(isinstance(m, QLoRALinear) for m in gpt.modules())
    assert gpt.blocks[0].attn.q_proj.weight.dtype == np.float32
    assert all(p.requires_grad for p in gpt.parameters())  # as trainable as before apply_qlora
    np.testing.assert_allclose(gpt(ids).data, expected, rtol=2e-5, atol=2e-5)
    # after a merge into the NF4 codes, unloading dequantizes those (rounded) weights as they are
    lm2 = _trained(apply_qlora(_gpt(), rank=4, alpha=8.0))
    with pytest.warns(UserWarning, match="requantizes"):
        lm2.merge_adapter()
    merged = lm2(ids).data
    np.testing.assert_allclose(lm2.merge_and_unload()(ids).data, merged, rtol=2e-5, atol=2e-5)


def test_unload_without_merge_and_merger_front():
    lm = _trained(apply_qlora(_gpt(), rank=4, alpha=8.0))
    ids = _ids()
    with lm.disable_adapter():
        base = lm(ids).data
    gpt = lm.unload()
    np.testing.assert_allclose(gpt(ids).data, base, rtol=2e-5, atol=2e-5)
    lm, twin = (_trained(apply_qlora(_gpt(), rank=4, alpha=8.0)) for _ in range(2))
    expected = lm(ids).data
    with pytest.warns(UserWarning, match="requantizes"):
        fl.LoRAMerger().merge(lm)
        twin.merge_adapter()
    np.testing.assert_array_equal(lm(ids).data, twin(ids).data)
    fl.LoRAMerger().unmerge(lm)
    np.testing.assert_array_equal(lm(ids).data, expected)


def test_a_refused_merge_changes_nothing():
    lm = _trained(apply_qlora(_gpt(), rank=4, alpha=8.0))
    lm.get_submodule("blocks.1.mlp.fc2").lora_B["default"].data[0, 0] = np.inf
    nf4 = _nf4_state(lm)
    with warnings.catch_warnings(), \
            pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2: merging adapter 'default' gives non-finite"):
        warnings.simplefilter("error")  # nothing was rounded, so nothing to warn about
        lm.merge_adapter()
    assert not lm.merged
    _assert_same_nf4(lm, nf4)
    with pytest.raises(ValueError, match="non-finite"):
        lm.merge_and_unload(safe_merge=True)
    assert isinstance(lm.get_submodule("blocks.0.attn.q_proj"), QLoRALinear)
