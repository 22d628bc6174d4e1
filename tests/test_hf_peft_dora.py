"""DoRA adapters of a Hugging Face GPT-2 both ways against real peft: logits and gradients of A, B
and the magnitude (c_attn's magnitude is per row of the fused weight, so it splits into q, k, v's),
and the merged model."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastlora as fl  # noqa: E402
from fastlora.lora import LoRAModel  # noqa: E402
from fastlora.testing.hf_models import logits, make_gpt2  # noqa: E402

ATOL = 1e-5
_OWN = {"attn.c_proj": "attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def ids(seed=1):
    return np.random.default_rng(seed).integers(0, 61, size=(2, 20))


@pytest.fixture
def base_dir(tmp_path):
    make_gpt2(tmp_path / "base")
    return tmp_path / "base"


def _peft_grads(model, x):
    """{GPT-2 module path: {"A", "B", "m": grad}} after one loss.backward() (eval mode: no dropout)."""
    model.eval().zero_grad()
    model(torch.tensor(x), labels=torch.tensor(x)).loss.backward()
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        path = name.split(".lora_")[0].replace("base_model.model.", "")
        kind = {"A": "A", "B": "B", "m": "m"}[name.split(".lora_")[1][0]]
        out.setdefault(path, {})[kind] = p.grad.numpy().copy()
    return out


def _own_grads(lm, x):
    lm.eval()
    for p in lm.lora_parameters():
        p.grad = None
    fl.cross_entropy(lm(x), x).backward()
    out = {}
    for path in lm._targets[lm.active_adapter]:
        layer = lm.get_submodule(path)
        A, B, m = layer.lora_parameters()
        out[path] = {"A": A.grad, "B": B.grad, "m": m.grad}
    return out


def _randomize(lm, seed=1):
    rng = np.random.default_rng(seed)
    for p in lm.lora_parameters():
        p.data[...] = p.data + rng.standard_normal(p.shape) * 0.2
    return lm.eval()


def test_dora_trained_by_peft_loads_with_the_same_logits_and_gradients(tmp_path, base_dir):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                             use_dora=True)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(base_dir), config)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.tensor(ids())
    for _ in range(3):  # real steps: B, A and the magnitude all move
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    model.eval().save_pretrained(tmp_path / "dora")
    lm = LoRAModel.from_pretrained(fl.from_pretrained(base_dir), tmp_path / "dora").eval()
    assert lm.peft_config["default"].use_dora
    np.testing.assert_allclose(lm(ids(2)).data, logits(model, ids(2)), rtol=0, atol=ATOL)

    want, got = _peft_grads(model, ids(2)), _own_grads(lm, ids(2))
    assert len(want) == 8 and len(got) == 12  # c_attn, attn.c_proj, c_fc, mlp.c_proj; q, k, v, out_proj, fc1, fc2
    for hf_path, g in want.items():
        block, kind = hf_path.split(".")[2], hf_path.split(".", 3)[3]
        if kind == "attn.c_attn":  # peft's one A is shared by our q, k and v; B and m split by rows
            parts = [got[f"blocks.{block}.attn.{p}_proj"] for p in "qkv"]
            mine = {"A": sum(p["A"] for p in parts), "B": np.concatenate([p["B"] for p in parts]),
                    "m": np.concatenate([p["m"] for p in parts])}
        else:
            mine = got[f"blocks.{block}.{_OWN[kind]}"]
        for part in "ABm":
            scale = np.abs(g[part]).max()
            np.testing.assert_allclose(mine[part], g[part], rtol=0, atol=2e-4 * scale + 1e-7,
                                       err_msg=f"{hf_path} {part}")

    merged = model.merge_and_unload()  # and peft's merge is ours
    np.testing.assert_allclose(lm.merge_and_unload()(ids(3)).data, logits(merged, ids(3)), rtol=0, atol=ATOL)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "fc2"], ["q_proj", "k_proj", "v_proj", "out_proj"]])
def test_dora_made_here_loads_in_peft_with_the_same_logits_and_gradients(tmp_path, base_dir, targets):
    lm = _randomize(LoRAModel(fl.from_pretrained(base_dir), targets, rank=3, alpha=6, use_dora=True).inject_lora())
    want = lm(ids()).data
    lm.save_pretrained(tmp_path / "dora")
    from safetensors.numpy import load_file
    tensors = load_file(str(tmp_path / "dora" / "adapter_model.safetensors"))
    m = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"]
    q = lm.get_submodule("blocks.0.attn.q_proj")
    assert m.shape == (48,)
    np.testing.assert_array_equal(m[:16], q.lora_magnitude_vector["default"].data)
    if "k_proj" not in targets:  # k's rows of c_attn carry no adapter: their own norms, m / n = 1
        k = lm.get_submodule("blocks.0.attn.k_proj")
        np.testing.assert_allclose(m[16:32], np.linalg.norm(k.weight.data, axis=1), rtol=1e-6)
    model = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base_dir),
                                           tmp_path / "dora", is_trainable=True).eval()
    np.testing.assert_allclose(logits(model, ids()), want, rtol=0, atol=ATOL)

    theirs, mine = _peft_grads(model, ids()), _own_grads(lm, ids())
    assert len(mine) == 2 * len(targets)
    D = 16
    for path, g in mine.items():
        block, name = path.split(".")[1], path.split(".", 2)[2]
        if name in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):  # rows of c_attn; A stacked, B block-diagonal
            c = theirs[f"transformer.h.{block}.attn.c_attn"]
            parts = [p for p in ("q", "k", "v") if f"attn.{p}_proj" in [t if "." in t else f"attn.{t}" for t in targets]]
            j, col = "qkv".index(name[5]), parts.index(name[5]) * 3
            rows = slice(j * D, (j + 1) * D)
            pairs = [(g["m"], c["m"][rows]), (g["B"], c["B"][rows, col:col + 3]), (g["A"], c["A"][col:col + 3])]
        else:
            hf = {"attn.out_proj": "attn.c_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}[name]
            c = theirs[f"transformer.h.{block}.{hf}"]
            pairs = [(g["m"], c["m"]), (g["B"], c["B"]), (g["A"], c["A"])]
        for ours, peft_grad in pairs:
            np.testing.assert_allclose(ours, peft_grad, rtol=0, atol=2e-4 * np.abs(peft_grad).max() + 1e-7,
                                       err_msg=path)
