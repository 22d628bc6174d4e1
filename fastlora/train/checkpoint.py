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
the model before any tensor is read, and every field of the state is validated
before the trainer, model or optimizer is changed (fastlora.train.resume).
"""
import hashlib
import json
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
