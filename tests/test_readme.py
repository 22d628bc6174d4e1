"""The README's "Using it" example runs as written (its `...` filled with bundled-task records)."""
import re
from pathlib import Path

from fastlora.tasks import make_examples

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"## Using it\n\n```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    assert ", ...]" in code  # the one placeholder: more records of the user's own
    more = [{k: r[k] for k in ("instruction", "input", "output")} for r in make_examples(40, seed=0)]
    monkeypatch.chdir(tmp_path)  # it writes run/ and adapter/
    namespace = {"MORE_RECORDS": more}
    exec(compile(code.replace(", ...]", "] + MORE_RECORDS"), str(README), "exec"), namespace)
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert len(namespace["losses"]) == 18  # 41 records in batches of 8 (6 steps) for 3 epochs
    printed = capsys.readouterr().out
    assert "trainable params:" in printed
    table = printed.split("trainable params:", 1)[1]
    assert "full_finetune" in table and "\nlora " in table and "perplexity" in table  # fl.format_table's


def test_the_bring_your_own_model_example_runs(tmp_path, monkeypatch):
    """Both code blocks of "Bring your own model", on a tiny GPT-2 folder made here."""
    import json

    import numpy as np
    import pytest
    pytest.importorskip("peft")
    from fastlora.testing.hf_models import logits, make_gpt2, make_gpt2_tokenizer
    section = README.read_text(encoding="utf-8").split("## Bring your own model", 1)[1].split("\n## ", 1)[0]
    ours, theirs = re.findall(r"```python\n(.*?)```", section, re.S)
    monkeypatch.chdir(tmp_path)
    records = [{k: r[k] for k in ("instruction", "input", "output")} for r in make_examples(24, seed=0)]
    (tmp_path / "my.json").write_text(json.dumps(records))
    tok = make_gpt2_tokenizer("gpt2-folder", [r["instruction"] + r["input"] + r["output"] for r in records])
    make_gpt2("gpt2-folder", vocab_size=len(tok), n_positions=256)
    mine = {}
    exec(compile(ours, str(README), "exec"), mine)
    other = {}
    exec(compile(theirs, str(README), "exec"), other)
    ids = np.random.default_rng(0).integers(0, len(tok), size=(1, 12))
    merged = mine["lora"].model.eval()  # merge_and_unload() merged in place
    want = merged(ids).data
    tol = 1e-4 * np.abs(want).max()  # merged vs peft's unmerged sum: float32 rounding apart
    np.testing.assert_allclose(logits(other["model"].eval(), ids), want, rtol=0, atol=tol)
    np.testing.assert_allclose(logits(other["merged"].eval(), ids), want, rtol=0, atol=tol)
