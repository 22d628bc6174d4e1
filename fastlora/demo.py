"""`fastlora demo`: base vs full fine-tuning vs LoRA vs QLoRA on the bundled tasks, side by side.

Loads the bundled base GPT and tokenizer, fine-tunes a copy fully, another with LoRA (rank 8
on q/k/v/out/fc1/fc2) and a third with QLoRA (the same adapters over those weights stored as
NF4) for the same number of steps on the bundled instruction data, merges the LoRA adapter,
and prints loss, perplexity, token accuracy, exact match, trainable parameters, training time
and peak memory for each. Writes results.json, the LoRA adapter, and (when matplotlib is
installed) loss_curves.png to the output folder.
"""
import os
import time

import numpy as np

from fastlora import assets
from fastlora.data import FinetuneDataset
from fastlora.eval import Benchmark, format_table, train_full_finetune, train_lora, train_qlora
from fastlora.io import write_json_atomic
from fastlora.lora import LoRAMerger
from fastlora.tasks import FactFormatter

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# the demo's own settings (the table in the README was made with them), not the library's defaults
DEFAULTS = dict(batch_size=16, epochs=3, full_lr=1e-3, lora_lr=4e-3, rank=8, alpha=16.0, weight_decay=0.0)


def prepare(max_train=None, max_eval=None):
    """(base model, tokenizer, train dataset, eval dataset) from the bundled files."""
    base, tokenizer = assets.load_base()
    length = base.config.max_seq_len
    train = assets.TRAIN_DATA if max_train is None else _head(assets.TRAIN_DATA, max_train)
    evals = assets.EVAL_DATA if max_eval is None else _head(assets.EVAL_DATA, max_eval)
    return (base, tokenizer, FinetuneDataset(train, tokenizer, max_length=length),
            FinetuneDataset(evals, tokenizer, max_length=length))


def _head(path, n):
    from fastlora.data import load_records
    return load_records(path)[:n]


def _settings(steps, progress, seed, overrides):
    cfg = {**DEFAULTS, **overrides}
    common = dict(batch_size=cfg["batch_size"], epochs=cfg["epochs"], max_steps=steps, progress=progress,
                  seed=seed, warmup_ratio=0.05, weight_decay=cfg["weight_decay"])
    adapters = dict(rank=cfg["rank"], alpha=cfg["alpha"], target_modules=LORA_TARGETS, lr=cfg["lora_lr"])
    return cfg, common, adapters


def finetune_both(base, train_ds, steps=None, progress=True, seed=0, **overrides):
    """(full fine-tuned copy, LoRA model) trained for the same steps with the demo's settings."""
    cfg, common, adapters = _settings(steps, progress, seed, overrides)
    full = train_full_finetune(base, train_ds, lr=cfg["full_lr"], run_name="full fine-tune", **common)
    lora = train_lora(base, train_ds, run_name="LoRA r8", **adapters, **common)
    return full, lora


def finetune_qlora(base, train_ds, steps=None, progress=True, seed=0, **overrides):
    """A QLoRA model with LoRA's settings: the same adapters over the targets stored as NF4."""
    _, common, adapters = _settings(steps, progress, seed, overrides)
    return train_qlora(base, train_ds, run_name="QLoRA r8", **adapters, **common)


def run_demo(out_dir="fastlora-demo", steps=None, exact_match_limit=100, progress=True, echo=print):
    started = time.perf_counter()
    base, tokenizer, train_ds, eval_ds = prepare()
    echo(f"base model: {base.num_parameters():,} parameters; {len(train_ds)} training and {len(eval_ds)} "
         f"eval records of 5 tasks; tokenizer of {tokenizer.vocab_size} tokens")
    echo("fine-tuning fully, then with LoRA (rank 8 on q/k/v/out/fc1/fc2), then QLoRA (the same on NF4 weights) ...")
    full, lora = finetune_both(base, train_ds, steps=steps, progress=progress)
    qlora = finetune_qlora(base, train_ds, steps=steps, progress=progress)

    os.makedirs(out_dir, exist_ok=True)
    lora.save_adapter(os.path.join(out_dir, "adapter"))
    # merging folds the adapter into the base weights: same outputs, no LoRA overhead
    probe = np.asarray(eval_ds[0]["input_ids"])[None]
    unmerged = lora(probe).data
    LoRAMerger().merge(lora)
    merge_diff = float(np.abs(lora(probe).data - unmerged).max())

    bench = Benchmark(eval_dataset=eval_ds, exact_match_limit=exact_match_limit, progress=progress)
    models = {"base": base, "full_finetune": full, "lora_r8 (merged)": lora, "qlora_r8 (NF4 base)": qlora}
    asked = len(eval_ds) if exact_match_limit is None else min(exact_match_limit, len(eval_ds))
    echo(f"evaluating the {len(models)} models on {len(eval_ds)} eval records (exact match on {asked}) ...")
    results = bench.compare(models)
    echo("")
    echo(format_table(results))
    echo("\n" + lora_vs_full(results["lora_r8 (merged)"], results["full_finetune"]))
    echo(lora_vs_full(results["qlora_r8 (NF4 base)"], results["full_finetune"], name="QLoRA r8 (NF4 base)"))
    prose = prose_losses(models, tokenizer, eval_ds)
    echo("forgetting: loss per answer token on the eval tasks asked in the base's own prose, not the template")
    echo("  " + ", ".join(f"{name} {loss:.3f}" for name, loss in prose.items()))
    echo(f"merged LoRA vs unmerged: max |logit difference| = {merge_diff:.2e}")
    write_json_atomic(os.path.join(out_dir, "results.json"),
                      {"results": results, "prose_loss": prose, "merge_max_abs_diff": merge_diff})
    plot = plot_losses({"full_finetune": full.fastlora_train_losses, "lora_r8": lora.fastlora_train_losses,
                        "qlora_r8": qlora.fastlora_train_losses},
                       os.path.join(out_dir, "loss_curves.png"))
    echo(f"wrote {out_dir}/results.json, {out_dir}/adapter/" + (f", {plot}" if plot else
                                                                 " (pip install matplotlib for a loss plot)"))
    echo(f"demo finished in {time.perf_counter() - started:.0f}s")
    return results


def prose_losses(models, tokenizer, eval_ds):
    """{name: loss per answer token} on the eval records asked as the pretraining corpus states
    its facts (tasks.FactFormatter, no EOS): how much of the base's own skill each model kept.
    Full fine-tuning overwrites more of it than the adapters do."""
    prose = FinetuneDataset(eval_ds.records, tokenizer, max_length=eval_ds.max_length,
                            formatter=FactFormatter(), add_eos=False)
    bench = Benchmark(eval_dataset=prose, exact_match_limit=0)
    return {name: bench.evaluate(model)["loss"] for name, model in models.items()}


def lora_vs_full(lora, full, name="LoRA r8"):
    """One line: an adapter's eval loss as a multiple of full fine-tuning's, and its trainable share."""
    share = 100.0 * lora["trainable_params"] / lora["total_params"]
    return (f"{name} vs full fine-tuning: eval loss {lora['loss']:.4f} vs {full['loss']:.4f} "
            f"({lora['loss'] / full['loss']:.2f}x) with {share:.2f}% of the parameters trained")


def plot_losses(curves, path):
    """Write a PNG of training-loss curves; returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        ax.plot(np.arange(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_title("fastlora demo: full fine-tuning vs LoRA vs QLoRA")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
