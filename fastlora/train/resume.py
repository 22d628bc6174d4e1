"""Resuming a run: every field of a checkpoint checked against the trainer before anything changes.

plan_resume(trainer, path) opens the checkpoint (header and JSON state only), compares the
model's parameter names, shapes and dtypes, the run (data order, batch size, seed; and the
learning rate, optimizer hyper-parameters and training data, which may change only when
allowed), the position and history, the RNG states and the schedule, then reads the arrays and
refuses any NaN or infinity. Its ResumePlan.apply(trainer) then changes the trainer, model and
optimizer; the optimizer's own load, which checks before it commits, is the only step that can
still refuse, and it comes first.
"""
import json
import math
import os
import warnings

from fastlora.errors import FastloraError
from fastlora.optim import WarmupCosineSchedule, join_state
from fastlora.train import checkpoint as ckpt


class ResumePlan:
    """Everything a checkpoint restores, checked; apply(trainer) puts it in place."""

    def __init__(self, path, **fields):
        self.path = path
        self.__dict__.update(fields)

    def apply(self, trainer):
        try:  # checks everything before it changes anything, and nothing was changed before it
            trainer.optimizer.load_state_dict(join_state(self.optimizer, self.optimizer_arrays))
        except (KeyError, TypeError, ValueError) as exc:
            raise FastloraError(f"{self.path}: checkpoint state is invalid: {exc}") from None
        # all checked: nothing below can fail
        trainer.schedule.load_state_dict(self.schedule)
        trainer.model.load_state_dict(self.model_arrays)
        for rng, state in self.rngs:
            rng.bit_generator.state = state
        if self.missing_rngs:
            shown = self.missing_rngs[:3]
            warnings.warn(f"{self.path}: no RNG state for {shown}{'...' if len(self.missing_rngs) > 3 else ''} "
                          "(written before fastlora saved it); their dropout masks will differ from the "
                          "uninterrupted run's", RuntimeWarning, stacklevel=3)
        trainer.step, trainer.epoch, trainer.batch_in_epoch = self.position
        trainer.losses, trainer.eval_losses, trainer.skipped_steps, trainer._bad_in_a_row = self.history
        trainer._batches = None  # rebuilt from (seed, epoch), skipping what was consumed
        trainer.last_checkpoint = self.path


def plan_resume(trainer, path, allow_changes=False):
    """A ResumePlan for `trainer` from the checkpoint at `path`; FastloraError naming the file and
    the field at fault otherwise, with nothing changed."""
    path = os.fspath(path)
    entries, state = ckpt.open_checkpoint(path)
    ckpt.check_model_arrays(path, trainer.model, {k[len("model."):]: e for k, e in entries.items()
                                                  if k.startswith("model.")})
    _check_same_run(path, state, trainer, allow_changes)
    position = check_position(path, state, trainer)
    history = check_history(path, state, position[0])
    rngs, missing = ckpt.check_rng_states(path, trainer.model, state.get("model_rngs", {}))
    optimizer, schedule = state.get("optimizer"), state.get("schedule")
    if not isinstance(optimizer, dict) or not isinstance(schedule, dict):
        raise FastloraError(f"{path}: checkpoint fields 'optimizer' and 'schedule' must be objects")
    if allow_changes:  # this run's hyper-parameters and base learning rates, the checkpoint's buffers
        groups = optimizer.get("param_groups")
        if isinstance(groups, list) and len(groups) == len(trainer.optimizer.param_groups):
            ours = hyper_parameters(trainer.optimizer)
            optimizer = dict(optimizer, param_groups=[dict(g, **o) if isinstance(g, dict) else g
                                                      for g, o in zip(groups, ours)])
        schedule = dict(schedule, base_lrs=list(trainer.schedule.base_lrs))
    # the position comes from the checkpoint; the shape of the schedule from this run, so a run
    # resumed with more epochs or max_steps decays over its new length (same length: identical
    # to the uninterrupted run)
    schedule = dict(schedule, warmup_steps=trainer.schedule.warmup_steps,
                    total_steps=trainer.schedule.total_steps)
    _check_schedule(path, schedule, trainer)
    model_arrays, optimizer_arrays = ckpt.read_arrays(path, entries)
    for kind, arrays in (("weight", model_arrays), ("optimizer buffer", optimizer_arrays)):
        bad = ckpt.first_non_finite(arrays)
        if bad is not None:
            raise FastloraError(f"{path}: {kind} {bad} holds NaN or infinite values; a checkpoint to resume "
                                f"from must be finite")
    return ResumePlan(path, model_arrays=model_arrays, optimizer=optimizer, optimizer_arrays=optimizer_arrays,
                      schedule=schedule, rngs=rngs, missing_rngs=missing, position=position, history=history)


# --- the run ------------------------------------------------------------------------------------------

def hyper_parameters(optimizer):
    """Each group's hyper-parameters except the scheduled lr, as JSON would give them back."""
    groups = [{k: g[k] for k in getattr(optimizer, "HYPER", ()) if k != "lr"} for g in optimizer.param_groups]
    return json.loads(json.dumps(groups))


def _describe_lrs(lrs):
    return ", ".join(f"{v:g}" for v in lrs) if isinstance(lrs, list) else repr(lrs)


def run_changes(state, trainer):
    """What differs between the run that wrote `state` and `trainer`'s: learning rate, other
    optimizer hyper-parameters, training data. A list of phrases (empty when nothing did)."""
    changes = []
    schedule = state.get("schedule") if isinstance(state.get("schedule"), dict) else {}
    saved_lrs = schedule.get("base_lrs")
    if saved_lrs is not None and saved_lrs != list(trainer.schedule.base_lrs):
        changes.append(f"lr {_describe_lrs(list(trainer.schedule.base_lrs))} "
                       f"(the checkpoint's run: {_describe_lrs(saved_lrs)})")
    optimizer = state.get("optimizer") if isinstance(state.get("optimizer"), dict) else {}
    saved_groups = optimizer.get("param_groups")
    if isinstance(saved_groups, list):
        ours = hyper_parameters(trainer.optimizer)
        for gi, (theirs, mine) in enumerate(zip(saved_groups, ours)):
            for k, v in mine.items():
                if isinstance(theirs, dict) and k in theirs and theirs[k] != v:
                    where = f" (group {gi})" if len(ours) > 1 else ""
                    changes.append(f"{k}{where} {v!r} (the checkpoint's run: {theirs[k]!r})")
    run = state.get("run") if isinstance(state.get("run"), dict) else {}
    if "data_sha256" in run and run["data_sha256"] != trainer.data_fingerprint():
        changes.append("the training data (same number of examples, other tokens)")
    return changes


def _check_same_run(path, state, trainer, allow_changes):
    run = state.get("run", {})
    if not isinstance(run, dict):
        raise FastloraError(f"{path}: checkpoint field 'run' must be an object")
    ours = {"dataset_size": len(trainer.dataset), "batch_size": trainer.batch_size, "seed": trainer.seed,
            "grad_accum_steps": trainer.grad_accum_steps}
    differ = [f"{k} {run.get(k)!r} (this trainer: {v!r})" for k, v in ours.items() if run.get(k) != v]
    if differ:
        raise FastloraError(f"{path}: written for a run with {', '.join(differ)}; the data order and step "
                            f"boundaries would not continue where it stopped")
    changes = run_changes(state, trainer)
    if changes and not allow_changes:
        raise FastloraError(f"{path}: this run differs from the checkpoint's in {'; '.join(changes)}; resume "
                            "with the same settings and data, or allow the change (fastlora train "
                            "--allow-changes, Trainer.load_checkpoint(path, allow_changes=True))")


class _Groups:
    """Just enough of an optimizer (param_groups) for a scratch WarmupCosineSchedule."""

    def __init__(self, groups):
        self.param_groups = groups


def _check_schedule(path, schedule, trainer):
    """Try `schedule` on a scratch schedule, so loading it into the trainer's cannot fail."""
    ours = trainer.schedule
    scratch = WarmupCosineSchedule(_Groups([{"lr": g["lr"]} for g in trainer.optimizer.param_groups]),
                                   ours.warmup_steps, ours.total_steps, ours.min_lr_ratio)
    try:
        scratch.load_state_dict(schedule)
    except (KeyError, TypeError, ValueError) as exc:
        raise FastloraError(f"{path}: checkpoint field 'schedule' is invalid: {exc}") from None


# --- position and history ---------------------------------------------------------------------------

def _int(path, key, value, low=0, high=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f" in [{low}, {high}]" if high is not None else f" >= {low}"
        raise FastloraError(f"{path}: checkpoint field {key!r} must be an int{bound}, got {_preview(value)}")
    return value


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _preview(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_position(path, state, trainer):
    """(step, epoch, batch_in_epoch) of a state: in range and agreeing with each other."""
    step = _int(path, "step", state.get("step"))
    if step > trainer.total_steps:
        raise FastloraError(f"{path}: checkpoint is at step {step}, past the {trainer.total_steps} steps this "
                            f"run plans; give it more epochs or max_steps to continue")
    epoch = _int(path, "epoch", state.get("epoch"), 0, trainer.epochs)
    batch = _int(path, "batch_in_epoch", state.get("batch_in_epoch"), 0, trainer.batches_per_epoch)
    expected = epoch * trainer.steps_per_epoch + math.ceil(batch / trainer.grad_accum_steps)
    if step != expected:
        raise FastloraError(f"{path}: checkpoint is at step {step}, but its data position (epoch {epoch}, "
                            f"micro-batch {batch}) is that of step {expected}")
    return step, epoch, batch


def check_history(path, state, step):
    """(losses, eval_losses, skipped_steps, bad_in_a_row) of a state, each checked against `step`."""
    losses = state.get("losses", [])
    if not isinstance(losses, list) or len(losses) != step or not all(_number(x) for x in losses):
        raise FastloraError(f"{path}: checkpoint field 'losses' must be a list of {step} numbers (one per "
                            f"step done), got {_preview(losses)}")
    evals = state.get("eval_losses", [])
    if not isinstance(evals, list) or not all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], int) and not isinstance(e[0], bool)
            and 0 <= e[0] <= step and _number(e[1]) for e in evals):
        raise FastloraError(f"{path}: checkpoint field 'eval_losses' must be a list of [step, loss] pairs "
                            f"with steps up to {step}, got {_preview(evals)}")
    skipped = state.get("skipped_steps", [])
    if not isinstance(skipped, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < step for s in skipped):
        raise FastloraError(f"{path}: checkpoint field 'skipped_steps' must be a list of steps below {step}, "
                            f"got {_preview(skipped)}")
    bad = _int(path, "bad_in_a_row", state.get("bad_in_a_row", 0), 0, step)
    return [float(x) for x in losses], [(int(s), float(v)) for s, v in evals], list(skipped), bad
