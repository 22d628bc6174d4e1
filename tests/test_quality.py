"""The quality bar on the bundled data (seeded): LoRA r8 on q/k/v/out/fc1/fc2 vs full fine-tuning.

Measured on this repo's bundled base (150 steps, the first 100 eval records): base loss 8.19
(accuracy 17%), full fine-tuning 0.70 (80%), LoRA r8 1.03 (71%), LoRA/full = 1.46. Over the
demo's 3 epochs: full 0.41, LoRA 0.63 (1.54). Issue 5 asks for LoRA within 10% of full
fine-tuning, which this tiny 2-layer base does not reach: per task, LoRA lags most on
reversing and sorting words (0.84 vs 0.41, 0.71 vs 0.49), and rank 64 still leaves 1.2x, so
the gap is the rank-limited update, not the learning rate (2e-3 to 1e-2 and LoRA+ measured no
better). This test pins what holds, so a regression in LoRA or the trainer fails it:
under 5% of the parameters trainable, both far below the base, LoRA's token accuracy
within 12 points of full fine-tuning's and its loss within 1.6x.
"""
import pytest

from fastlora.demo import LORA_TARGETS, prepare
from fastlora.eval import Benchmark, train_full_finetune, train_lora

STEPS = 150


@pytest.fixture(scope="module")
def bundled():
    return prepare(max_eval=100)


def test_lora_r8_against_full_finetuning_on_the_bundled_tasks(bundled):
    base, _, train_ds, eval_ds = bundled
    common = dict(batch_size=16, epochs=2, max_steps=STEPS, warmup_ratio=0.05, seed=0)
    full = train_full_finetune(base, train_ds, lr=1e-3, **common)
    lora = train_lora(base, train_ds, rank=8, alpha=16.0, target_modules=LORA_TARGETS, lr=4e-3, **common)

    bench = Benchmark(eval_dataset=eval_ds, exact_match_limit=0)
    r = bench.compare({"base": base, "full": full, "lora": lora})
    pct = 100.0 * r["lora"]["trainable_params"] / r["lora"]["total_params"]
    assert pct < 5.0
    assert r["full"]["loss"] < 0.15 * r["base"]["loss"]
    assert r["lora"]["loss"] < 0.15 * r["base"]["loss"]
    assert r["lora"]["loss"] < 1.6 * r["full"]["loss"]
    assert r["lora"]["accuracy"] > r["full"]["accuracy"] - 0.12
    assert r["lora"]["accuracy"] > 3 * r["base"]["accuracy"]
