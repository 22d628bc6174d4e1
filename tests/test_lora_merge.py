"""LoRAMerger: merged == unmerged == expected, unmerge restores W, refusals, merge_and_unload."""
import numpy as np
import pytest

from fastlora import GPT
from fastlora.lora import LoRALinear, LoRAMerger, LoRAModel
from fastlora.nn import Linear

CFG = dict(vocab_size=60, embed_dim=24, num_heads=3, num_layers=2, max_seq_len=16, seed=2)


def _trained_lora(targets=("q_proj", "v_proj", "fc2"), rank=4, alpha=8, seed=0):
    """A LoRA GPT whose adapters hold non-zero weights, as after training."""
    model = GPT(**CFG)
    lm = LoRAModel(model, list(targets), rank=rank, alpha=alpha).inject_lora()
    rng = np.random.default_rng(seed)
    for p in lm.lora_parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.2
    return lm


def _ids(seed=0):
    return np.random.default_rng(seed).integers(0, CFG["vocab_size"], size=(3, 12))


def test_merged_equals_unmerged_equals_expected():
    lm = _trained_lora()
    ids = _ids()
    base_w = {p: m.weight.data.copy() for p, m in lm.named_modules() if isinstance(m, LoRALinear)}
    unmerged = lm(ids).data.copy()

    expected_model = GPT(**CFG)  # a plain GPT holding W + (alpha/r) B A, built by hand
    expected_model.load_state_dict({k: v for k, v in lm.state_dict().items() if ".lora_" not in k})
    for path, m in lm.named_modules():
        if isinstance(m, LoRALinear):
            A, B = m.lora_A["default"].data, m.lora_B["default"].data
            expected_model.get_submodule(path).weight.data[...] = base_w[path] + (8 / 4) * B @ A
    expected = expected_model(ids).data

    merger = LoRAMerger()
    merger.merge(lm)
    assert lm.merged
    merged = lm(ids).data
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-6)

    merger.unmerge(lm)
    assert not lm.merged
    for path, w in base_w.items():
        np.testing.assert_allclose(lm.get_submodule(path).weight.data, w, rtol=0, atol=1e-6)
    np.testing.assert_allclose(lm(ids).data, unmerged, rtol=1e-5, atol=1e-6)


def test_merge_twice_and_unmerge_unmerged_are_refused():
    lm = _trained_lora()
    merger = LoRAMerger()
    with pytest.raises(ValueError, match="nothing is merged"):
        merger.unmerge(lm)
    merger.merge(lm)
    snapshot = {k: v.copy() for k, v in lm.state_dict().items()}
    with pytest.raises(ValueError, match="already merged"):
        merger.merge(lm)
    for k, v in lm.state_dict().items():
        np.testing.assert_array_equal(v, snapshot[k])  # a refused merge writes nothing
    with pytest.raises(ValueError, match="merged into the weights"):
        lm.disable_lora()
    lm.add_adapter("other")
    with pytest.raises(ValueError, match="unmerge before switching"):
        lm.set_adapter("other")
    with pytest.raises(ValueError, match="unmerge it before deleting"):
        lm.delete_adapter("default")


def test_merge_refused_while_disabled():
    lm = _trained_lora()
    lm.disable_lora()
    with pytest.raises(ValueError, match="enable_lora"):
        LoRAMerger().merge(lm)
    assert not lm.merged


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    lm = _trained_lora()
    last = lm.get_submodule("blocks.1.mlp.fc2")
    last.lora_B["default"].data[0, 0] = np.inf  # the last layer: earlier ones would be merged first
    snapshot = {k: v.copy() for k, v in lm.state_dict().items()}
    with pytest.raises(ValueError, match=r"blocks.1.mlp.fc2: merging adapter 'default' gives non-finite"):
        LoRAMerger(safe_merge=True).merge(lm)
    assert not lm.merged
    for k, v in lm.state_dict().items():
        np.testing.assert_array_equal(v, snapshot[k])
    with pytest.raises(ValueError, match="non-finite"):
        lm.merge_and_unload(safe_merge=True)
    assert not lm.merged and isinstance(last, LoRALinear)


def test_merge_and_unload_gives_a_plain_gpt_that_saves_and_loads(tmp_path):
    lm = _trained_lora()
    ids = _ids(1)
    before = lm(ids).data.copy()
    lora_count = sum(p.size for p in lm.lora_parameters())
    gpt = LoRAMerger().merge_and_unload(lm)
    assert type(gpt) is GPT
    assert not any(isinstance(m, LoRALinear) for m in gpt.modules())
    assert type(gpt.get_submodule("blocks.0.attn.q_proj")) is Linear
    names = [n for n, _ in gpt.named_parameters()]
    assert names == [n for n, _ in GPT(**CFG).named_parameters()]
    assert all(p.requires_grad for p in gpt.parameters())  # trainable again, as it came in
    assert sum(p.size for p in gpt.parameters()) == sum(p.size for p in GPT(**CFG).parameters())
    np.testing.assert_allclose(gpt(ids).data, before, rtol=1e-5, atol=1e-6)
    assert lora_count > 0

    gpt.save(tmp_path / "merged.safetensors")
    loaded = GPT.load(tmp_path / "merged.safetensors")
    np.testing.assert_array_equal(loaded(ids).data, gpt(ids).data)
    from safetensors.numpy import load_file
    assert not any("lora" in k for k in load_file(str(tmp_path / "merged.safetensors")))
    with pytest.raises(RuntimeError, match="unloaded"):
        lm.lora_parameters()


def test_merger_on_the_bare_model_and_unload_without_merge():
    lm = _trained_lora()
    gpt = lm.model  # the GPT holding the LoRA layers, without its LoRAModel
    ids = _ids(2)
    before = gpt(ids).data.copy()
    merger = LoRAMerger()
    merger.merge(gpt)
    np.testing.assert_allclose(gpt(ids).data, before, rtol=1e-5, atol=1e-6)
    merger.unmerge(gpt)
    out = merger.merge_and_unload(gpt)
    assert out is gpt and not any(isinstance(m, LoRALinear) for m in gpt.modules())
    np.testing.assert_allclose(gpt(ids).data, before, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no LoRA layers"):
        merger.merge(gpt)

    lm2 = _trained_lora(seed=3)
    base = lm2.unload()  # LoRA layers dropped, the delta not applied
    np.testing.assert_array_equal(base(ids).data, GPT(**CFG)(ids).data)


def test_seed_level4_merge_keeps_quality_and_counts():
    """The LoRA half of the level-4 test: merge in place, same outputs, few trained parameters."""
    lm = _trained_lora(targets=("q_proj", "v_proj"), rank=4)
    ids = _ids(3)
    before = lm(ids).data.copy()
    merger = LoRAMerger()
    merger.merge(lm)
    np.testing.assert_allclose(lm(ids).data, before, rtol=1e-5, atol=1e-6)
    trainable, total = lm.get_nb_trainable_parameters()
    full = sum(p.size for p in GPT(**CFG).parameters())
    assert trainable < full * 0.1
