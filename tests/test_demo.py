"""`fastlora demo` end to end in a few steps: every model in the table, and the files it writes."""
import json

from fastlora.demo import run_demo


def test_the_demo_runs_end_to_end_and_writes_its_files(tmp_path):
    lines = []
    results = run_demo(out_dir=tmp_path, steps=2, exact_match_limit=2, progress=False, echo=lines.append)
    assert list(results) == ["base", "full_finetune", "lora_r8 (merged)", "qlora_r8 (NF4 base)"]
    for name in ("full_finetune", "lora_r8 (merged)", "qlora_r8 (NF4 base)"):
        assert len(results[name]["train_losses"]) == 2 and results[name]["training_time_s"] > 0
    assert results["qlora_r8 (NF4 base)"]["weights_mb"] < 0.5 * results["base"]["weights_mb"]
    printed = "\n".join(lines)
    assert "LoRA r8 vs full fine-tuning" in printed and "QLoRA r8 (NF4 base) vs full fine-tuning" in printed
    assert "forgetting: loss per answer token" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["results"]) == set(saved["prose_loss"]) == set(results)
    assert saved["merge_max_abs_diff"] < 1e-4
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
