"""Benchmark: loss, perplexity, token accuracy and exact match of models on an eval dataset.

    bench = Benchmark(eval_dataset=eval_ds)
    results = bench.compare({"base": base, "full_finetune": full, "lora_rank4": lora})
    print(format_table(results))

Metrics, per model:
  loss / perplexity   mean cross-entropy per response token (labels != -100), and exp of it
  accuracy            share of response tokens whose argmax prediction is right
  exact_match         share of records whose greedy generation (until EOS) equals the reference
                      output exactly (needs a FinetuneDataset, which keeps its records); a record
                      whose prompt leaves no room in the context counts as a miss
  trainable_params    parameters with requires_grad; total_params: all weights (a QLoRA model's NF4
                      weights included, as its trainable_percentage() counts them)
  weights_mb          every stored weight in MiB: float parameters, and a QLoRA model's NF4 codes
                      and scales
  training_time_s / peak_memory_mb   for models made by train_full_finetune / train_lora /
                      train_qlora (peak: what training allocated beyond the model itself)
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import numpy as np

from fastlora._typing import Metrics
from fastlora.autograd import no_grad
from fastlora.nn.causal_lm import token_scores
from fastlora.progress import bar

IGNORE_INDEX = -100


class Benchmark:
    """Benchmark(model=None, eval_dataset=...): evaluate() one model, compare() several.
    progress=True: a bar per model (or a log line each where no terminal watches; fastlora.progress)."""

    def __init__(self, model: Any = None, eval_dataset: Any = None, batch_size: int = 16,
                 exact_match_limit: Optional[int] = None, max_new_tokens: Optional[int] = None,
                 progress: bool = False) -> None:
        if eval_dataset is None:
            raise ValueError("eval_dataset is required")
        if len(eval_dataset) == 0:
            raise ValueError("eval_dataset is empty")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        for name, value in (("exact_match_limit", exact_match_limit), ("max_new_tokens", max_new_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an int >= 0 or None, got {value!r}")
        self.model = model
        self.eval_dataset = eval_dataset
        self.batch_size = batch_size
        self.exact_match_limit = exact_match_limit
        self.max_new_tokens = max_new_tokens
        self.progress = progress
        self._name = "model"  # what evaluate() is scoring, for the progress bar's label

    def evaluate(self, model: Any = None, name: str = "model") -> Metrics:
        """{"loss", "perplexity", "accuracy", "exact_match", "trainable_params", "total_params", ...}.
        `name` labels the progress bar."""
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("evaluate() needs a model (give one here or to Benchmark(model=...))")
        self._name = name
        loss, accuracy, tokens = self._loss_and_accuracy(model)
        trainable, total = _parameter_counts(model)
        result = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "accuracy": accuracy,
            "exact_match": self._exact_match(model),
            "trainable_params": trainable,
            "total_params": total,
            "weights_mb": _weight_bytes(model) / 2 ** 20,
            "eval_tokens": tokens,
        }
        for key in ("training_time_s", "peak_memory_mb", "train_losses"):
            value = getattr(model, "fastlora_" + key, None)
            if value is not None:
                result[key] = value
        return result

    def compare(self, models: Mapping[str, Any]) -> Dict[str, Metrics]:
        """{name: evaluate(model)} for a dict of models, in the dict's order."""
        if not isinstance(models, dict) or not models:
            raise ValueError("compare() takes a non-empty dict of {name: model}")
        return {name: self.evaluate(model, name) for name, model in models.items()}

    # --- metrics -----------------------------------------------------------------------------
    def _batches(self):
        from fastlora.data import DataLoader
        return DataLoader(self.eval_dataset, batch_size=self.batch_size, shuffle=False)

    def _loss_and_accuracy(self, model):
        was_training = getattr(model, "training", True)
        model.eval()
        loss_sum, correct, count = 0.0, 0, 0
        try:
            with no_grad():
                batches = self._batches()
                for batch in bar(batches, len(batches), f"eval {self._name}: loss", self.progress, "batches"):
                    labels = batch["labels"]
                    if not np.any(labels[:, 1:] != IGNORE_INDEX):
                        continue
                    # the head fused into the loss where the model has one: no (B, T, V) logits
                    batch_loss, n, hits = token_scores(model, batch["input_ids"], labels, IGNORE_INDEX,
                                                       position_ids=batch.get("position_ids"))
                    loss_sum += batch_loss
                    correct += hits
                    count += n
        finally:
            model.train(was_training)
        if count == 0:
            raise ValueError("the eval dataset has no response token to score")
        return loss_sum / count, correct / count, count

    def _exact_match(self, model):
        """Greedy generation from each record's prompt, compared with the reference output
        (a conversation's last assistant turn, read up to the template's end-of-turn)."""
        ds = self.eval_dataset
        records = getattr(ds, "records", None)
        tokenizer, ask = getattr(ds, "tokenizer", None), getattr(ds, "prompt_and_reference", None)
        if records is None or tokenizer is None or ask is None:
            return None  # not a FinetuneDataset: nothing to generate from
        n = len(records) if self.exact_match_limit is None else min(len(records), self.exact_match_limit)
        eos = tokenizer.eos_token_id
        max_seq_len = _max_seq_len(model)
        hits = asked = 0
        for i in bar(range(n), n, f"eval {self._name}: exact match", self.progress and n > 0,
                 "records"):
            question = ask(i)
            if question is None:
                continue  # a text record has no answer to ask for
            prompt, want, stops = question
            asked += 1
            budget = self.max_new_tokens or len(list(tokenizer.encode(want))) + 2 + 4 * sum(map(len, stops))
            if max_seq_len is not None:
                budget = min(budget, max_seq_len - len(prompt))
            if budget <= 0:
                continue
            stop = {"stop_strings": stops, "tokenizer": tokenizer} if stops else {}
            out = model.generate(prompt, max_new_tokens=budget, temperature=0, eos_token_id=eos, **stop)
            new = [int(t) for t in out[len(prompt):]]
            if eos in new:
                new = new[: new.index(eos)]
            text = tokenizer.decode(new)
            for stop in stops:
                text = text.split(stop, 1)[0]
            hits += text.strip() == want.strip()
        return hits / asked if asked else None


def _max_seq_len(model):
    for candidate in (model, getattr(model, "base_model", None)):
        cfg = getattr(candidate, "config", None)
        if cfg is not None and hasattr(cfg, "max_seq_len"):
            return cfg.max_seq_len
    return None


def _parameter_counts(model):
    """(trainable, total) parameters: a (Q)LoRAModel's own count, which for QLoRA includes the
    NF4 weights (weights, though not Parameters), else the sizes of model.parameters()."""
    counts = getattr(model, "get_nb_trainable_parameters", None)
    if counts is not None:
        return tuple(int(n) for n in counts())
    params = list(model.parameters())
    return int(sum(p.size for p in params if p.requires_grad)), int(sum(p.size for p in params))


def _weight_bytes(model):
    """Bytes of every stored weight: the float parameters, plus a QLoRA model's NF4 codes and scales."""
    from fastlora.lora.qlora import NF4Weight
    total = sum(p.data.nbytes for p in model.parameters())
    # NF4 weights are not Parameters; found on any module, so a GPT that apply_qlora changed in
    # place counts them as its QLoRAModel wrapper does
    quantized = (getattr(m, "weight", None) for _, m in model.named_modules())
    total += sum(w.nbytes for w in quantized if isinstance(w, NF4Weight))
    return int(total)


def format_table(results: Mapping[str, Metrics]) -> str:
    """A fixed-width text table of compare() results, one row per model."""
    columns = [("model", None), ("loss", "{:.4f}"), ("perplexity", "{:.2f}"), ("accuracy", "{:.1%}"),
               ("exact_match", "{:.1%}"), ("trainable_params", "{:,}"), ("trainable_%", "{:.2f}"),
               ("weights_mb", "{:.2f}"), ("training_time_s", "{:.1f}"), ("peak_memory_mb", "{:.1f}")]
    # a column no model has (training time of models that were only loaded) is left out
    columns = columns[:1] + [(c, fmt) for c, fmt in columns[1:]
                             if c == "trainable_%" or any(r.get(c) is not None for r in results.values())]
    rows = []
    for name, r in results.items():
        r = dict(r, **{"trainable_%": 100.0 * r["trainable_params"] / max(r["total_params"], 1)})
        rows.append([name] + [("-" if r.get(c) is None else fmt.format(r[c])) for c, fmt in columns[1:]])
    header = [c for c, _ in columns]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
