"""Issue 5's quality bar on the bundled data, seeded: LoRA of rank 8 on q/k/v/out/fc1/fc2 reaches
an eval loss within 10% of full fine-tuning for the same number of steps, with under 5% of the
parameters trainable, and both beat the base model clearly.

It runs exactly what `fastlora demo` runs (finetune_both: three epochs, 375 steps, seed 0) on
the whole bundled train and eval sets, so the demo's printed table is what this test checks.
Measured with this repo's base (seed 0): base loss 6.36 (token accuracy 24%), full fine-tuning
0.276 (91.2%), LoRA 0.230 (92.0%), LoRA/full = 0.83, 4.06% of the parameters trainable. Seeds 1
and 2 gave 0.95 and 0.91. Before the base was pretrained on fresh facts (scripts/pretrain_base.py
says why) the same run gave 1.54: the base had not learnt the skills, and LoRA learnt less of
them during fine-tuning than full fine-tuning did.
"""
import pytest

from fastlora import assets
from fastlora.data import FinetuneDataset
from fastlora.demo import finetune_both, prepare
from fastlora.eval import Benchmark
from fastlora.tasks import FactFormatter, make_examples


@pytest.fixture(scope="module")
def trained():
    """{"base", "full", "lora"} models, the tokenizer and the eval set: the demo's training."""
    base, tokenizer, train_ds, eval_ds = prepare()
    full, lora = finetune_both(base, train_ds, progress=False, seed=0)
    return {"base": base, "full": full, "lora": lora}, tokenizer, eval_ds


@pytest.fixture(scope="module")
def demo_results(trained):
    models, _, eval_ds = trained
    return Benchmark(eval_dataset=eval_ds, exact_match_limit=0).compare(models)


def test_lora_r8_is_within_10_percent_of_full_finetuning(demo_results):
    r = demo_results
    assert r["lora"]["loss"] <= 1.10 * r["full"]["loss"], (r["lora"]["loss"], r["full"]["loss"])


def test_lora_trains_under_5_percent_of_the_parameters(demo_results):
    lora = demo_results["lora"]
    assert lora["trainable_params"] < 0.05 * lora["total_params"]
    assert lora["total_params"] == demo_results["base"]["total_params"] + lora["trainable_params"]


def test_lora_keeps_more_of_the_base_skill_than_full_finetuning(trained):
    # "LoRA learns less and forgets less": asked in the corpus's prose rather than the template,
    # the base answers best; full fine-tuning lost most of that (seed 0: base 0.30, full 1.95,
    # LoRA 0.72 nats per answer token)
    from fastlora.demo import prose_losses
    models, tokenizer, eval_ds = trained
    prose = prose_losses(models, tokenizer, eval_ds)
    assert prose["base"] < prose["lora"] < 0.5 * prose["full"], prose


def test_both_beat_the_base_model_clearly(demo_results):
    r = demo_results
    for name in ("full", "lora"):
        assert r[name]["loss"] < 0.1 * r["base"]["loss"], name
        assert r[name]["accuracy"] > r["base"]["accuracy"] + 0.5, name


def _answer_loss(model, tokenizer, records, **formatting):
    """Loss per answer token, no EOS (the corpus's prose goes on after an answer)."""
    data = FinetuneDataset(records, tokenizer, max_length=128, add_eos=False, **formatting)
    return Benchmark(eval_dataset=data, exact_match_limit=0).evaluate(model)["loss"]


def test_the_base_has_the_skills_in_prose_but_not_the_instruction_format():
    # what makes the bar reachable (scripts/pretrain_base.py): asked in the corpus's own prose,
    # the base answers the eval records' reversing, sorting, capitalising and number-words well;
    # in the instruction format it does not, so fine-tuning has the format to teach. Measured:
    # prose 0.08 / 0.17 / 0.02 / 0.18 nats per answer token, instruction format 4-5.
    base, tokenizer = assets.load_base()
    for task in ("reverse", "sort", "capitalize", "number_words"):
        records = [{k: r[k] for k in ("instruction", "input", "output")}
                   for r in make_examples(200, seed=1) if r["task"] == task]
        prose = _answer_loss(base, tokenizer, records, formatter=FactFormatter())
        instructed = _answer_loss(base, tokenizer, records)
        assert prose < 0.3, (task, prose)
        assert instructed > 2.0, (task, instructed)
