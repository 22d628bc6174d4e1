"""train_full_finetune, train_lora and train_qlora: train a copy of a base model, measure time and memory.

All three leave `base` untouched (they train a deep copy) and return the trained model with
`fastlora_training_time_s`, `fastlora_peak_memory_mb` (tracemalloc's peak of NumPy and Python
allocations during training) and `fastlora_train_losses` set, which Benchmark reports.
"""
from __future__ import annotations

import time
import tracemalloc
from typing import Any, Optional, Sequence

from fastlora.defaults import LORA_TARGETS, LR_FULL, LR_LORA, WEIGHT_DECAY
from fastlora.optim import AdamW
from fastlora.train import Trainer

DEFAULT_LORA_TARGETS = LORA_TARGETS


def _train(model, params, dataset, lr, weight_decay, trainer_kw):
    optimizer = AdamW(params, lr=lr, weight_decay=weight_decay)
    trainer_kw.setdefault("progress", False)
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    baseline = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    try:
        trainer = Trainer(model, optimizer, dataset, **trainer_kw)
        losses = trainer.train()
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        if not tracing:
            tracemalloc.stop()
    model.fastlora_training_time_s = elapsed
    model.fastlora_peak_memory_mb = peak / 2 ** 20
    model.fastlora_train_losses = losses
    return model


def train_full_finetune(base: Any, dataset: Any, lr: float = LR_FULL, weight_decay: float = WEIGHT_DECAY,
                        **trainer_kw: Any) -> Any:
    """A copy of `base` with every parameter trained (AdamW); `base` is not modified."""
    model = base.copy()
    model.requires_grad_(True)
    return _train(model, list(model.parameters()), dataset, lr, weight_decay, trainer_kw)


def train_lora(base: Any, dataset: Any, rank: int = 4, alpha: Optional[float] = None,
               target_modules: Sequence[str] = DEFAULT_LORA_TARGETS, dropout: float = 0.0, lr: float = LR_LORA,
               weight_decay: float = WEIGHT_DECAY, **trainer_kw: Any) -> Any:
    """A LoRAModel over a copy of `base` with only the adapters trained; `base` is not modified.
    alpha=None means alpha = rank, as in LoRAModel."""
    from fastlora.lora import LoRAModel
    model = LoRAModel(base.copy(), target_modules=list(target_modules), rank=rank, alpha=alpha, dropout=dropout)
    model.inject_lora()
    return _train(model, model.lora_parameters(), dataset, lr, weight_decay, trainer_kw)


def train_qlora(base: Any, dataset: Any, rank: int = 4, alpha: Optional[float] = None,
                target_modules: Optional[Sequence[str]] = None, block_size: int = 64, double_quant: bool = True,
                dropout: float = 0.0, lr: float = LR_LORA, weight_decay: float = WEIGHT_DECAY,
                **trainer_kw: Any) -> Any:
    """A QLoRA model over a copy of `base`: the targets' weights stored as NF4 (double-quantized
    absmax by default), LoRA adapters on top, only the adapters trained; `base` is not modified.
    `target_modules` defaults to QLoRA's usual every linear of the blocks; alpha=None means alpha = rank."""
    from fastlora.lora.qlora import QLORA_TARGETS, apply_qlora
    model = apply_qlora(base.copy(), rank=rank, alpha=alpha if alpha is not None else float(rank),
                        target_modules=list(target_modules or QLORA_TARGETS), block_size=block_size,
                        double_quant=double_quant, dropout=dropout)
    return _train(model, model.lora_parameters(), dataset, lr, weight_decay, trainer_kw)
