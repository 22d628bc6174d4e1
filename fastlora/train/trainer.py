"""Trainer: the fine-tuning loop (full or LoRA), evaluation and resumable checkpoints.

One training step is one optimizer update over `grad_accum_steps` micro-batches: forward,
masked cross-entropy (token-weighted across the micro-batches), backward, gradient clipping,
optimizer step, schedule step. Only the parameters the optimizer holds are updated, so full
fine-tuning and LoRA differ only in what is passed to the optimizer.

Resuming from a checkpoint reproduces the uninterrupted run exactly: the checkpoint holds the
weights, the optimizer's buffers, the schedule position, the position in the epoch's data
order (a function of seed and epoch) and the state of every RNG (dropout's and LoRA dropout's).
Ctrl-C saves one, and a step is applied whole or not at all: the update is held together
against Ctrl-C, and the position in the data only moves when the update is done, so an
interrupted step is redone on resume.

No checkpoint holds a broken state. A step whose loss or gradient norm is not finite is
skipped and counted (max_bad_steps in a row stop the run). A save due every `save_every` steps
is written once the next step has shown the weights give a finite loss and gradient (before
that step changes them), every save refuses NaN or infinite arrays, and a run that cannot
go on stops with TrainingDiverged naming the last checkpoint written, which is therefore good.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
import warnings
from itertools import islice
from typing import Any, List, Optional

import numpy as np

from fastlora._runtime import process as _process
from fastlora._typing import PathLike
from fastlora.autograd import no_grad
from fastlora.errors import FastloraError, RunFolderError, TrainingDiverged
from fastlora.io import remove_stale_temporaries
from fastlora.log import get_logger
from fastlora.nn.causal_lm import causal_lm_loss
from fastlora.optim import NonFiniteGradientWarning, WarmupCosineSchedule, clip_grad_norm, split_state
from fastlora.train import checkpoint as ckpt
from fastlora.train import distributed as _distributed
from fastlora.train import run_folder
from fastlora.train.checkpoint import first_non_finite, rng_generators, rng_states, write_checkpoint
from fastlora.train.resume import plan_resume
from fastlora.train.run_folder import CHECKPOINT_NAME

logger = get_logger(__name__)


@contextlib.contextmanager
def _ctrl_c_held():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block ends, so the update
    the block makes is never half-applied. Only the main thread can set signal handlers; in
    another thread the block runs as it is."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is None or threading.current_thread() is not threading.main_thread():
        yield  # None: a handler set outside Python, which cannot be put back
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        if callable(previous):
            previous(*held[0])  # Python's default handler raises KeyboardInterrupt here
        elif previous == signal.SIG_DFL:
            raise KeyboardInterrupt


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise FastloraError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _set_rngs(pairs):
    for rng, state in pairs:
        rng.bit_generator.state = state


def _model_config(model):
    """The GPTConfig of a GPT, or of the GPT inside a LoRAModel-like wrapper (None if neither)."""
    for candidate in (model, getattr(model, "base_model", None), getattr(model, "model", None)):
        cfg = getattr(candidate, "config", None)
        if cfg is not None and hasattr(cfg, "max_seq_len"):
            return cfg
    return None


class Trainer:
    """Trainer(model, optimizer, dataset, batch_size=4, epochs=3, ...).

    train() -> list of the loss of every step; evaluate(dataset) -> mean loss per scored token;
    save_checkpoint(path) / load_checkpoint(path) -> resume exactly where a run stopped.
    After train(), `metrics` holds the run's summary (train_runtime, train_loss,
    train_tokens_per_second, ..., best_eval_loss; fastlora.progress.StepProgress.summary).

    progress=True shows a bar on a terminal or in a notebook, and elsewhere logs a line (step, loss,
    lr, tokens/s, ETA) every `logging_steps` steps or 30 seconds, then the summary; `run_name`
    labels them.

    Under `mpiexec -n N` it trains data-parallel (fastlora.train.distributed): batch_size is the
    global batch, split over the ranks, and the run equals one process's on the same batches.
    distributed=True requires MPI, False trains alone even under mpiexec.
    """

    def __init__(self, model: Any, optimizer: Any, dataset: Any, batch_size: int = 4, epochs: int = 3,
                 eval_dataset: Any = None, max_grad_norm: Optional[float] = 1.0, warmup_ratio: float = 0.1,
                 min_lr_ratio: float = 0.1, grad_accum_steps: int = 1, seed: int = 0, progress: bool = True,
                 collator: Any = None, max_steps: Optional[int] = None, checkpoint_dir: Optional[PathLike] = None,
                 save_every: Optional[int] = None, eval_every: Optional[int] = None, max_bad_steps: int = 3,
                 group_by_length: bool = False, logging_steps: Optional[int] = None,
                 run_name: Optional[str] = None, distributed: Any = None) -> None:
        from fastlora.data import DataCollator, DataLoader
        self.model, self.optimizer, self.dataset, self.eval_dataset = model, optimizer, dataset, eval_dataset
        self.batch_size = _positive_int("batch_size", batch_size)
        self.epochs = _positive_int("epochs", epochs)
        self.grad_accum_steps = _positive_int("grad_accum_steps", grad_accum_steps)
        self.max_bad_steps = _positive_int("max_bad_steps", max_bad_steps)
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise FastloraError(f"max_grad_norm must be > 0 or None (no clipping), got {max_grad_norm!r}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise FastloraError(f"warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise FastloraError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        for name, value in (("max_steps", max_steps), ("save_every", save_every), ("eval_every", eval_every),
                            ("logging_steps", logging_steps)):
            if value is not None:
                _positive_int(name, value)
        if len(dataset) == 0:
            raise FastloraError("dataset is empty: nothing to train on")
        self.max_grad_norm = max_grad_norm
        self.seed = int(seed)
        self.progress, self.logging_steps, self.run_name = progress, logging_steps, run_name
        self.metrics = None
        self.checkpoint_dir = checkpoint_dir
        self.save_every, self.eval_every = save_every, eval_every
        self._check_lengths(dataset, "dataset")
        if eval_dataset is not None:
            self._check_lengths(eval_dataset, "eval_dataset")

        pad = getattr(getattr(dataset, "tokenizer", None), "pad_token_id", 0) or 0
        self.collator = collator if collator is not None else DataCollator(pad_token_id=pad)
        self._loader_kw = dict(batch_size=self.batch_size, collator=self.collator)
        # one process, or this rank's part of every global batch (under mpiexec)
        self._dist = _distributed.attach(distributed)
        if not self._dist.is_main:
            self.progress = False  # rank 0 alone prints
        self.loader = self._dist.shard(DataLoader(dataset, shuffle=True, seed=self.seed,
                                                  group_by_length=group_by_length, **self._loader_kw))
        self.batches_per_epoch = len(self.loader)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.grad_accum_steps)
        planned = self.epochs * self.steps_per_epoch
        self.total_steps = min(planned, max_steps) if max_steps else planned
        self.schedule = WarmupCosineSchedule(optimizer, warmup_steps=int(warmup_ratio * self.total_steps),
                                             total_steps=self.total_steps, min_lr_ratio=min_lr_ratio)
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        # position and history (all of it goes into checkpoints)
        self.step = 0            # optimizer updates done
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of this epoch already consumed
        self.losses = []         # loss of every step (NaN where a step was skipped)
        self.eval_losses = []    # (step, eval loss)
        self.skipped_steps = []  # steps whose loss or gradient norm was not finite
        self._bad_in_a_row = 0
        self._batches = None     # iterator over the current epoch's micro-batches
        self._open_step_rngs = None  # RNG states at the start of a step not yet applied
        self._save_due = False   # a periodic save waits for the next step to show the weights are good
        self._fingerprint = None  # of the training data, computed on the first save or load
        self.last_checkpoint = None

    def _check_lengths(self, dataset, name):
        cfg = _model_config(self.model)
        if cfg is None:
            return
        for i in range(len(dataset)):
            n = len(dataset[i]["input_ids"])
            if n > cfg.max_seq_len:
                raise FastloraError(f"{name}[{i}] has {n} tokens, more than the model's max_seq_len="
                                 f"{cfg.max_seq_len}; build the dataset with max_length <= {cfg.max_seq_len}")

    # --- the loop ------------------------------------------------------------------------------
    def train(self) -> List[float]:
        """Train until total_steps; return the loss of every step (of the whole run, if resumed).
        NumPy's BLAS gets back the thread count it had (the kernels leave it at one). With a
        checkpoint_dir, the folder is held (fastlora.train.run_folder) for the whole run."""
        main = self._dist.is_main  # rank 0 alone holds and writes the folder
        held = run_folder.hold(self.checkpoint_dir) if self.checkpoint_dir and main else contextlib.nullcontext()
        # under MPI: ranks checked alike first, a rank that fails ends the job (distributed.guard)
        with self._dist.running(self), _process.runtime(), held:  # the folder checked writable and locked before step 0
            return self._train_loop()

    def _train_loop(self):
        from fastlora.progress import StepProgress
        desc = f"train {self.run_name}" if self.run_name else "train"
        bar = StepProgress(self.total_steps, initial=self.step, desc=desc, enabled=bool(self.progress),
                           every_steps=self.logging_steps)
        self.model.train()
        generators = rng_generators(self.model)
        if self.checkpoint_dir and self._dist.is_main:
            if self.last_checkpoint is None and os.path.exists(self.default_checkpoint_path()):
                raise RunFolderError(f"{self.default_checkpoint_path()}: an earlier run's checkpoint; resume it "
                                     "with load_checkpoint(), or delete it or choose another checkpoint_dir")
            # left by a save that was killed; the run folder is ours now
            remove_stale_temporaries(self.checkpoint_dir, (CHECKPOINT_NAME, CHECKPOINT_NAME + ".json"))
        try:
            while self.step < self.total_steps:
                started = time.perf_counter()
                self._open_step_rngs = rng_states(self.model, generators)  # put back if interrupted
                group, position = self._next_group()
                loss, norm, tokens = self._train_step(group, position)
                elapsed = time.perf_counter() - started
                bar.update(self.step, loss, self.optimizer.param_groups[0]["lr"], tokens, elapsed)
                if self.eval_every and self.eval_dataset is not None and self.step % self.eval_every == 0:
                    self.eval_losses.append((self.step, self.evaluate(self.eval_dataset)))
                    self.model.train()
                if self.checkpoint_dir and self.save_every and self.step % self.save_every == 0:
                    self._save_due = True  # written by the next step, once its loss is finite
        except KeyboardInterrupt:
            # an interrupted step changed no weight (see _train_step): put back its dropout RNGs
            # and draw its batches again, so the checkpoint continues as if it never started
            if self._open_step_rngs is not None:
                _set_rngs((rng, self._open_step_rngs[key]) for key, rng in generators)
            self._batches = None
            if self.checkpoint_dir:
                path = self._save_checked("interrupted")
                if self._dist.is_main:
                    print(f"\ninterrupted at step {self.step}; resume from {path}", file=sys.stderr)
            raise
        finally:
            bar.close()
        if self.checkpoint_dir:
            self._save_checked("finished")
        self.metrics = bar.summary(self.step, self.step / self.steps_per_epoch, self.eval_losses)
        if self.progress:
            logger.info(f"{desc} done: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in self.metrics.items()))
        return list(self.losses)

    def _next_group(self):
        """(the micro-batches of the next step, the data position after it). Fewer than
        grad_accum_steps at an epoch's end. The position is committed by _train_step."""
        epoch, start = self.epoch, self.batch_in_epoch
        if start >= self.batches_per_epoch:
            epoch, start = epoch + 1, 0
            self._batches = None
        if self._batches is None:
            self._batches = self.loader.iter_epoch(epoch, start)
        take = min(self.grad_accum_steps, self.batches_per_epoch - start)
        return list(islice(self._batches, take)), (epoch, start + take)

    def _train_step(self, group, position):
        """One update over the micro-batches in `group`, then the data moves on to `position`;
        returns (loss, grad norm, tokens)."""
        self.optimizer.zero_grad()
        counts = [int(np.count_nonzero(b["labels"][:, 1:] != -100)) for b in group]
        total = self._dist.global_count(sum(counts))  # of the whole global batch, over every rank
        if total == 0:
            raise FastloraError(f"step {self.step}: the batch has no response token to train on "
                             f"(every label is -100); check the dataset's labels")
        self._dist.attach_grads(self._params)
        loss_sum, tokens = 0.0, 0
        for batch, count in zip(group, counts):
            if count == 0:
                continue
            # the head fused into the loss where the model has one: no (B, T, V) logits
            loss = causal_lm_loss(self.model, batch["input_ids"], batch["labels"], **_positions(batch))
            # token-weighted mean over the whole group, as if it were one big batch
            loss.backward(np.asarray(count / total, dtype=loss.dtype))
            loss_sum += float(loss.data) * count
            tokens += int(np.asarray(batch.get("attention_mask", batch["input_ids"])).astype(bool).sum())
        loss_sum, tokens = self._dist.allreduce_grads(self._params, loss_sum, tokens)  # summed over the ranks
        step_loss = loss_sum / total
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonFiniteGradientWarning)  # counted below instead
            norm = clip_grad_norm(self._params, self.max_grad_norm if self.max_grad_norm else math.inf)
        if self._save_due and math.isfinite(step_loss) and math.isfinite(norm):
            # the weights as the last step left them gave a finite loss and gradient: save them,
            # with the RNGs as this step found them (nothing of this step is applied yet)
            self._save_checked("periodic", rngs=self._open_step_rngs)
        with _ctrl_c_held():  # applied whole: weights, optimizer, schedule and position together
            if math.isfinite(step_loss) and math.isfinite(norm):
                self.optimizer.step()
                self._bad_in_a_row = 0
            else:  # the schedule still advances below: a skipped step keeps its place in the plan
                self.skipped_steps.append(self.step)
                self._bad_in_a_row += 1
                warnings.warn(f"step {self.step}: loss {step_loss}, gradient norm {norm}: not finite, "
                              f"update skipped", RuntimeWarning, stacklevel=3)
            self.optimizer.zero_grad()
            self.schedule.step()
            self.losses.append(step_loss if math.isfinite(step_loss) else float("nan"))
            self.step += 1
            self.epoch, self.batch_in_epoch = position
            self._open_step_rngs = None
        if self._bad_in_a_row >= self.max_bad_steps:
            raise TrainingDiverged(f"training stopped at step {self.step}: {self._bad_in_a_row} steps in a "
                                   f"row had a non-finite loss or gradient norm (try a lower learning "
                                   f"rate); {self._last_good()}")
        return step_loss, norm, tokens

    def _last_good(self):
        if self.last_checkpoint is None:
            return "no checkpoint was written"
        return f"the last good checkpoint is {self.last_checkpoint}"

    def _save_checked(self, why, rngs=None):
        """save_checkpoint to the default path, or TrainingDiverged naming the last good one when
        the weights or optimizer state are no longer finite (nothing is written then)."""
        self._save_due = False
        try:
            return self.save_checkpoint(self.default_checkpoint_path(), rngs=rngs)
        except _NonFinite as exc:
            raise TrainingDiverged(f"training stopped at step {self.step}: {exc}, so the {why} checkpoint was "
                                   f"not written (try a lower learning rate); {self._last_good()}") from None

    # --- evaluation ------------------------------------------------------------------------------
    def evaluate(self, dataset: Any = None) -> float:
        """Mean cross-entropy per scored (response) token over `dataset`; weights untouched."""
        from fastlora.data import DataLoader
        dataset = dataset if dataset is not None else self.eval_dataset
        if dataset is None:
            raise FastloraError("evaluate() needs a dataset (or eval_dataset given to the Trainer)")
        return evaluate_loss(self.model, DataLoader(dataset, shuffle=False, **self._loader_kw))

    # --- checkpoints -------------------------------------------------------------------------------
    def default_checkpoint_path(self):
        return os.path.join(self.checkpoint_dir, CHECKPOINT_NAME)

    def data_fingerprint(self):
        """SHA-256 of the training data's tokens (a resume on changed data is refused)."""
        if self._fingerprint is None:
            self._fingerprint = ckpt.data_fingerprint(self.dataset)
        return self._fingerprint

    def save_checkpoint(self, path: PathLike, rngs: Any = None) -> str:
        """Write weights, optimizer state, schedule, position and RNG states to `path`, atomically.
        Refuses (FastloraError, nothing written) when a weight or optimizer buffer is not finite."""
        meta, optim_arrays = split_state(self.optimizer.state_dict())
        model_arrays = self.model.state_dict()
        bad = first_non_finite(model_arrays) or first_non_finite(optim_arrays)
        if bad is not None:
            raise _NonFinite(f"{'weight' if bad in model_arrays else 'optimizer buffer'} {bad} holds NaN or "
                             f"infinite values")
        state = {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "losses": self.losses, "eval_losses": self.eval_losses, "skipped_steps": self.skipped_steps,
            "bad_in_a_row": self._bad_in_a_row,
            "optimizer": meta, "schedule": self.schedule.state_dict(),
            "model_rngs": rngs if rngs is not None else rng_states(self.model),
            "run": {"seed": self.seed, "batch_size": self.batch_size, "grad_accum_steps": self.grad_accum_steps,
                    "dataset_size": len(self.dataset), "total_steps": self.total_steps,
                    "data_sha256": self.data_fingerprint()},
        }
        if self._dist.is_main:  # every rank holds the same state
            write_checkpoint(path, model_arrays, optim_arrays, state)
        self.last_checkpoint = os.fspath(path)
        return self.last_checkpoint

    def load_checkpoint(self, path: PathLike, allow_changes: bool = False) -> None:
        """Restore everything save_checkpoint wrote. Everything is checked before anything changes:
        on any error the trainer, model and optimizer are left exactly as they were.

        A checkpoint of a run with another learning rate, other optimizer hyper-parameters or
        other training data is refused, the message saying what changed; allow_changes=True
        continues it with this trainer's settings and data.
        """
        plan_resume(self, path, allow_changes).apply(self)
        self._save_due = False

class _NonFinite(FastloraError):
    """save_checkpoint found a NaN or an infinity in what it was about to write."""


def _positions(batch):
    """{"position_ids": ...} for a batch of packed rows (FinetuneDataset(packing=True)), else {}."""
    return {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}


def evaluate_loss(model, batches):
    """Mean cross-entropy per scored token of `model` over an iterable of collated batches."""
    was_training = getattr(model, "training", True)
    model.eval()
    total, count = 0.0, 0
    try:
        with no_grad():
            for batch in batches:
                n = int(np.count_nonzero(batch["labels"][:, 1:] != -100))
                if n == 0:
                    continue
                total += float(causal_lm_loss(model, batch["input_ids"], batch["labels"], **_positions(batch)).data) * n
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise FastloraError("the evaluation data has no response token to score")
    return total / count
