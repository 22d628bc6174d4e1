"""Trainer: the fine-tuning loop (full or LoRA), evaluation and resumable checkpoints.

One training step is one optimizer update over `grad_accum_steps` micro-batches: forward,
masked cross-entropy (token-weighted across the micro-batches), backward, gradient clipping,
optimizer step, schedule step. Only the parameters the optimizer holds are updated, so full
fine-tuning and LoRA differ only in what is passed to the optimizer.

Resuming from a checkpoint reproduces the uninterrupted run exactly: the checkpoint holds the
weights, the optimizer's buffers, the schedule position, the position in the epoch's data
order (a function of seed and epoch) and the state of every RNG. Ctrl-C saves one, and a step
is applied whole or not at all: the update is held together against Ctrl-C, and the position
in the data only moves when the update is done, so an interrupted step is redone on resume.
"""
import contextlib
import math
import os
import signal
import sys
import threading
import time
import warnings
from itertools import islice

import numpy as np

from fastlora import _blas
from fastlora.autograd import cross_entropy, no_grad
from fastlora.optim import NonFiniteGradientWarning, WarmupCosineSchedule, clip_grad_norm, join_state, split_state
from fastlora.train.checkpoint import (check_model_arrays, read_checkpoint, rng_generators, rng_states,
                                       set_rng_states, write_checkpoint)


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


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient norm."""


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


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
    """

    def __init__(self, model, optimizer, dataset, batch_size=4, epochs=3, eval_dataset=None,
                 max_grad_norm=1.0, warmup_ratio=0.1, min_lr_ratio=0.1, grad_accum_steps=1, seed=0,
                 progress=True, collator=None, max_steps=None, checkpoint_dir=None, save_every=None,
                 eval_every=None, max_bad_steps=3, group_by_length=False):
        from fastlora.data import DataCollator, DataLoader
        self.model, self.optimizer, self.dataset, self.eval_dataset = model, optimizer, dataset, eval_dataset
        self.batch_size = _positive_int("batch_size", batch_size)
        self.epochs = _positive_int("epochs", epochs)
        self.grad_accum_steps = _positive_int("grad_accum_steps", grad_accum_steps)
        self.max_bad_steps = _positive_int("max_bad_steps", max_bad_steps)
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {max_grad_norm!r}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        for name, value in (("max_steps", max_steps), ("save_every", save_every), ("eval_every", eval_every)):
            if value is not None:
                _positive_int(name, value)
        if len(dataset) == 0:
            raise ValueError("dataset is empty: nothing to train on")
        self.max_grad_norm = max_grad_norm
        self.seed = int(seed)
        self.progress = progress
        self.checkpoint_dir = checkpoint_dir
        self.save_every, self.eval_every = save_every, eval_every
        self._check_lengths(dataset, "dataset")
        if eval_dataset is not None:
            self._check_lengths(eval_dataset, "eval_dataset")

        pad = getattr(getattr(dataset, "tokenizer", None), "pad_token_id", 0) or 0
        self.collator = collator if collator is not None else DataCollator(pad_token_id=pad)
        self._loader_kw = dict(batch_size=self.batch_size, collator=self.collator)
        self.loader = DataLoader(dataset, shuffle=True, seed=self.seed, group_by_length=group_by_length,
                                 **self._loader_kw)
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
        self.last_checkpoint = None

    def _check_lengths(self, dataset, name):
        cfg = _model_config(self.model)
        if cfg is None:
            return
        for i in range(len(dataset)):
            n = len(dataset[i]["input_ids"])
            if n > cfg.max_seq_len:
                raise ValueError(f"{name}[{i}] has {n} tokens, more than the model's max_seq_len="
                                 f"{cfg.max_seq_len}; build the dataset with max_length <= {cfg.max_seq_len}")

    # --- the loop ------------------------------------------------------------------------------
    def train(self):
        """Train until total_steps; return the loss of every step (of the whole run, if resumed).
        NumPy's BLAS gets back the thread count it had (the kernels leave it at one)."""
        with _blas.kept():
            return self._train_loop()

    def _train_loop(self):
        from tqdm.auto import tqdm
        quiet = not self.progress or not sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=quiet,
                   dynamic_ncols=True)
        self.model.train()
        generators = rng_generators(self.model)
        try:
            while self.step < self.total_steps:
                started = time.perf_counter()
                self._open_step_rngs = rng_states(self.model, generators)  # put back if interrupted
                group, position = self._next_group()
                loss, norm, tokens = self._train_step(group, position)
                elapsed = time.perf_counter() - started
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
                if self.eval_every and self.eval_dataset is not None and self.step % self.eval_every == 0:
                    self.eval_losses.append((self.step, self.evaluate(self.eval_dataset)))
                    self.model.train()
                if self.checkpoint_dir and self.save_every and self.step % self.save_every == 0:
                    self.save_checkpoint(self.default_checkpoint_path())
        except KeyboardInterrupt:
            # an interrupted step changed no weight (see _train_step): put back its dropout RNGs
            # and draw its batches again, so the checkpoint continues as if it never started
            if self._open_step_rngs is not None:
                set_rng_states(self.model, self._open_step_rngs)
            self._batches = None
            if self.checkpoint_dir:
                path = self.save_checkpoint(self.default_checkpoint_path())
                print(f"\ninterrupted at step {self.step}; resume from {path}", file=sys.stderr)
            raise
        finally:
            bar.close()
        if self.checkpoint_dir:
            self.save_checkpoint(self.default_checkpoint_path())
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
        total = sum(counts)
        if total == 0:
            raise ValueError(f"step {self.step}: the batch has no response token to train on "
                             f"(every label is -100); check the dataset's labels")
        loss_sum, tokens = 0.0, 0
        for batch, count in zip(group, counts):
            if count == 0:
                continue
            loss = cross_entropy(self.model(batch["input_ids"]), batch["labels"])
            # token-weighted mean over the whole group, as if it were one big batch
            loss.backward(np.asarray(count / total, dtype=loss.dtype))
            loss_sum += float(loss.data) * count
            tokens += int(np.asarray(batch.get("attention_mask", batch["input_ids"])).astype(bool).sum())
        step_loss = loss_sum / total
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonFiniteGradientWarning)  # counted below instead
            norm = clip_grad_norm(self._params, self.max_grad_norm if self.max_grad_norm else math.inf)
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
            where = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
            raise TrainingDiverged(f"training stopped at step {self.step}: {self._bad_in_a_row} steps in a "
                                   f"row had a non-finite loss or gradient norm (try a lower learning "
                                   f"rate){where}")
        return step_loss, norm, tokens

    # --- evaluation ------------------------------------------------------------------------------
    def evaluate(self, dataset=None):
        """Mean cross-entropy per scored (response) token over `dataset`; weights untouched."""
        from fastlora.data import DataLoader
        dataset = dataset if dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs a dataset (or eval_dataset given to the Trainer)")
        return evaluate_loss(self.model, DataLoader(dataset, shuffle=False, **self._loader_kw))

    # --- checkpoints -------------------------------------------------------------------------------
    def default_checkpoint_path(self):
        return os.path.join(self.checkpoint_dir, "checkpoint.safetensors")

    def save_checkpoint(self, path):
        """Write weights, optimizer state, schedule, position and RNG states to `path`, atomically."""
        meta, optim_arrays = split_state(self.optimizer.state_dict())
        state = {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "losses": self.losses, "eval_losses": self.eval_losses, "skipped_steps": self.skipped_steps,
            "bad_in_a_row": self._bad_in_a_row,
            "optimizer": meta, "schedule": self.schedule.state_dict(),
            "model_rngs": rng_states(self.model),
            "run": {"seed": self.seed, "batch_size": self.batch_size, "grad_accum_steps": self.grad_accum_steps,
                    "dataset_size": len(self.dataset), "total_steps": self.total_steps},
        }
        write_checkpoint(path, self.model.state_dict(), optim_arrays, state)
        self.last_checkpoint = os.fspath(path)
        return self.last_checkpoint

    def load_checkpoint(self, path):
        """Restore everything save_checkpoint wrote. On any error the trainer, model and optimizer
        are left exactly as they were."""
        model_arrays, optim_arrays, state = read_checkpoint(path)
        check_model_arrays(path, self.model, model_arrays)
        run = state.get("run", {})
        ours = {"dataset_size": len(self.dataset), "batch_size": self.batch_size, "seed": self.seed,
                "grad_accum_steps": self.grad_accum_steps}
        differ = [f"{k} {run.get(k)!r} (this trainer: {v!r})" for k, v in ours.items() if run.get(k) != v]
        if differ:
            raise ValueError(f"{path}: written for a run with {', '.join(differ)}; the data order and step "
                             f"boundaries would not continue where it stopped")
        old_optimizer, old_schedule = self.optimizer.state_dict(), self.schedule.state_dict()
        try:
            self.optimizer.load_state_dict(join_state(state["optimizer"], optim_arrays))
            # the position comes from the checkpoint; the shape of the schedule from this run, so a
            # run resumed with more epochs or max_steps decays over its new length (same length:
            # identical to the uninterrupted run)
            schedule = dict(state["schedule"], warmup_steps=self.schedule.warmup_steps,
                            total_steps=self.schedule.total_steps)
            self.schedule.load_state_dict(schedule)
            position = (int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"]))
        except (KeyError, TypeError, ValueError) as exc:
            self.optimizer.load_state_dict(old_optimizer)
            self.schedule.load_state_dict(old_schedule)
            raise ValueError(f"{path}: checkpoint state is invalid: {exc}") from None
        self.model.load_state_dict(model_arrays)  # shapes checked above: cannot fail half-way
        set_rng_states(self.model, state.get("model_rngs", {}))
        self.step, self.epoch, self.batch_in_epoch = position
        self.losses = [float(x) for x in state.get("losses", [])]
        self.eval_losses = [tuple(x) for x in state.get("eval_losses", [])]
        self.skipped_steps = list(state.get("skipped_steps", []))
        self._bad_in_a_row = int(state.get("bad_in_a_row", 0))
        self._batches = None  # rebuilt from (seed, epoch), skipping what was consumed
        self.last_checkpoint = os.fspath(path)


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
                total += float(cross_entropy(model(batch["input_ids"]), batch["labels"]).data) * n
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation data has no response token to score")
    return total / count
