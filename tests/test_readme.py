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
    assert "trainable params:" in printed and "'lora'" in printed
