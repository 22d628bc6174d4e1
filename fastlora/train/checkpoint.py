"""Trainer checkpoints: one safetensors file that holds everything, plus a readable JSON sidecar.

The file at `path` holds the model's weights (`model.<name>`), the optimizer's buffers
(`optimizer.<index>.<buffer>`) and, in the safetensors metadata under "fastlora_checkpoint",
the JSON state: step, epoch, position in the epoch, losses so far, optimizer hyper-parameters,
schedule position, every RNG state and what the run was (seed, batch size, learning rate,
a fingerprint of the training data). It is written to a temporary file and moved into place,
so a crash never leaves a torn checkpoint and the previous one survives. `path + ".json"`
repeats the JSON state for people and tools; loading reads the copy inside the file.

Reading is checked before anything is used: the header is parsed by hand and bounded by the
file's real size (fastlora.io), the names, shapes and dtypes of the weights are compared with
the model before any tensor is read, and every field of the state is validated (plan_resume)
before the trainer, model or optimizer is changed.
"""
import hashlib
import json
import math
import os

import numpy as np

from fastlora.errors import FastloraError
from fastlora.io import check_readable, read_tensors, safetensors_header, save_safetensors, write_json_atomic

FORMAT = 1
_META_KEY = "fastlora_checkpoint"
_KIND = "a valid checkpoint"
_NUMPY_DTYPES = {"F16": np.dtype(np.float16), "F32": np.dtype(np.float32), "F64": np.dtype(np.float64)}


def write_checkpoint(path, model_arrays, optimizer_arrays, state):
    """Write the arrays and the JSON `state` to `path` atomically, then the sidecar (the caller
    has checked that every array is finite: Trainer.save_checkpoint)."""
    arrays = {f"model.{k}": np.ascontiguousarray(v) for k, v in model_arrays.items()}
    arrays.update({f"optimizer.{k}": v for k, v in optimizer_arrays.items()})
    state = {"format": FORMAT, **state}
    text = json.dumps(state, allow_nan=True)  # losses of skipped steps are NaN
    save_safetensors(path, arrays, metadata={_META_KEY: text})
    write_json_atomic(os.fspath(path) + ".json", state)


def first_non_finite(arrays):
    """The name of the first floating array holding a NaN or an infinity, else None."""
    for name, a in arrays.items():
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            return name
    return None


def open_checkpoint(path):
    """(header entries, JSON state) of a checkpoint file; no tensor data is read.

    Errors name the file: missing, a pickle, not safetensors (truncated or corrupt), not a
    fastlora checkpoint, or of an unknown format.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FastloraError(f"{path}: a folder, not a checkpoint file")
    entries, meta = safetensors_header(path, kind=_KIND)
    if _META_KEY not in meta:
        raise FastloraError(f"{path}: a safetensors file but not a fastlora checkpoint "
                            f"(no {_META_KEY!r} metadata); load weights with GPT.load instead")
    try:
        state = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as exc:
        raise FastloraError(f"{path}: checkpoint state is not valid JSON ({exc})") from None
    except RecursionError:
        raise FastloraError(f"{path}: checkpoint state is JSON nested too deeply to read") from None
    if not isinstance(state, dict):
        raise FastloraError(f"{path}: checkpoint state must be a JSON object, got {type(state).__name__}")
    if state.get("format") != FORMAT:
        raise FastloraError(f"{path}: checkpoint format {state.get('format')!r}; this version reads {FORMAT}")
    for name, e in entries.items():
        if e["dtype"] not in _NUMPY_DTYPES:
            raise FastloraError(f"{path}: {name} has dtype {e['dtype']}; a checkpoint holds floating arrays")
    return entries, state


def read_arrays(path, entries):
    """(model arrays, optimizer arrays) of an opened checkpoint, sized before they are read."""
    check_readable(path, sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values()))
    arrays = read_tensors(path, list(entries), kind=_KIND)
    model = {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}
    optim = {k[len("optimizer."):]: v for k, v in arrays.items() if k.startswith("optimizer.")}
    return model, optim


def read_checkpoint(path):
    """(model arrays, optimizer arrays, state) from a checkpoint file; never unpickles."""
    entries, state = open_checkpoint(path)
    return (*read_arrays(path, entries), state)


def check_model_arrays(path, model, arrays):
    """Raise if `arrays` ({name: ndarray}, or a checkpoint's header entries) do not fit `model`
    exactly (names, shapes, dtypes): names the first mismatched parameter."""
    own = dict(model.named_parameters())
    for name, p in own.items():
        if name not in arrays:
            raise FastloraError(f"{path}: checkpoint has no weight for parameter {name!r} "
                                f"(was it written for a different model?)")
        shape, dtype = _shape_dtype(arrays[name])
        if shape != p.shape:
            raise FastloraError(f"{path}: parameter {name!r} has shape {shape} in the "
                                f"checkpoint but {p.shape} in the model")
        if dtype != p.data.dtype:
            # resuming would silently continue in another precision (a float16 file into a
            # float32 model loses the low bits of every weight the run had)
            raise FastloraError(f"{path}: parameter {name!r} is {dtype} in the checkpoint "
                                f"but {p.data.dtype} in the model; make the model in the checkpoint's dtype")
    extra = [k for k in arrays if k not in own]
    if extra:
        raise FastloraError(f"{path}: checkpoint has parameters the model lacks, e.g. {extra[0]!r}")


def _shape_dtype(entry):
    if isinstance(entry, np.ndarray):
        return entry.shape, entry.dtype
    return tuple(entry["shape"]), _NUMPY_DTYPES[entry["dtype"]]


# --- RNG states ----------------------------------------------------------------------------------

def rng_generators(model):
    """[(key, NumPy Generator)] for every Generator a module keeps in an attribute: Dropout's
    `rng`, LoRALinear's and LoRAModel's `_rng`, any other. The key is the module path for an
    attribute named `rng` (as checkpoints always wrote it), else '<module path>:<attribute>'.
    A Generator shared by several modules appears under each of their keys."""
    found = []
    for path, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, np.random.Generator):
                found.append((path if attr == "rng" else f"{path}:{attr}", value))
    return found


def rng_states(model, generators=None):
    """{key: bit-generator state} of every Generator of `model` (see rng_generators); pass
    rng_generators(model) as `generators` to skip walking the modules again (once per step)."""
    if generators is None:
        generators = rng_generators(model)
    return {key: rng.bit_generator.state for key, rng in generators}


def check_rng_states(path, model, states):
    """[(Generator, state)] to apply, every state tried on a scratch generator of the same kind
    first, so applying them cannot fail; plus the keys of the model's generators the checkpoint
    has no state for (a checkpoint from before fastlora saved them)."""
    if not isinstance(states, dict):
        raise FastloraError(f"{path}: 'model_rngs' must be an object, got {type(states).__name__}")
    generators = dict(rng_generators(model))
    plan = []
    for key, state in states.items():
        if key not in generators:
            raise FastloraError(f"{path}: has an RNG state for {key!r}, which this model does not have "
                                "(was it written for a different model?)")
        rng = generators[key]
        try:
            type(rng.bit_generator)().state = state
        except Exception as exc:  # noqa: BLE001 - NumPy raises TypeError/ValueError/KeyError
            raise FastloraError(f"{path}: the RNG state for {key!r} is invalid ({exc})") from None
        plan.append((rng, state))
    return plan, sorted(set(generators) - set(states))


# --- what a run is ---------------------------------------------------------------------------------

def data_fingerprint(dataset):
    """SHA-256 over the token ids and labels of every example: equal for the same training data."""
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        item = dataset[i]
        for key in ("input_ids", "labels"):
            digest.update(np.asarray(item.get(key, ()), dtype=np.int64).tobytes())
            digest.update(b"|")
    return digest.hexdigest()


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
    saved_lrs = state.get("schedule", {}).get("base_lrs") if isinstance(state.get("schedule"), dict) else None
    if saved_lrs is not None and saved_lrs != list(trainer.schedule.base_lrs):
        changes.append(f"lr {_describe_lrs(list(trainer.schedule.base_lrs))} "
                       f"(the checkpoint's run: {_describe_lrs(saved_lrs)})")
    saved_groups = state.get("optimizer", {}).get("param_groups") if isinstance(state.get("optimizer"), dict) else None
    if isinstance(saved_groups, list):
        ours = hyper_parameters(trainer.optimizer)
        for gi, (theirs, mine) in enumerate(zip(saved_groups, ours)):
            for k, v in mine.items():
                if isinstance(theirs, dict) and k in theirs and theirs[k] != v:
                    where = f" (group {gi})" if len(ours) > 1 else ""
                    changes.append(f"{k}{where} {v!r} (the checkpoint's run: {theirs[k]!r})")
    run = state.get("run") if isinstance(state.get("run"), dict) else {}
    if "data_sha256" in run and run["data_sha256"] != trainer.data_fingerprint():
        changes.append("the training data (same number of examples, different tokens)")
    return changes


# --- validating a state before resuming ------------------------------------------------------------

def _int(path, state, key, low=0, high=None):
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f" in [{low}, {high}]" if high is not None else f" >= {low}"
        raise FastloraError(f"{path}: checkpoint field {key!r} must be an int{bound}, got {value!r:.60}")
    return value


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


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
    bad = _int(path, {"bad_in_a_row": state.get("bad_in_a_row", 0)}, "bad_in_a_row", 0, step)
    return [float(x) for x in losses], [(int(s), float(v)) for s, v in evals], list(skipped), bad


def _preview(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_position(path, state, trainer):
    """(step, epoch, batch_in_epoch) of a state: in range and agreeing with each other."""
    step = _int(path, state, "step", 0, trainer.total_steps)
    epoch = _int(path, state, "epoch", 0, trainer.epochs)
    batch = _int(path, state, "batch_in_epoch", 0, trainer.batches_per_epoch)
    expected = epoch * trainer.steps_per_epoch + math.ceil(batch / trainer.grad_accum_steps)
    if step != expected:
        raise FastloraError(f"{path}: checkpoint is at step {step}, but its data position (epoch {epoch}, "
                            f"micro-batch {batch}) is that of step {expected}")
    return step, epoch, batch
