"""Trainer checkpoints: one safetensors file that holds everything, plus a readable JSON sidecar.

The file at `path` holds the model's weights (`model.<name>`), the optimizer's buffers
(`optimizer.<index>.<buffer>`) and, in the safetensors metadata under "fastlora_checkpoint",
the JSON state: step, epoch, position in the epoch, losses so far, optimizer hyper-parameters,
schedule position and every RNG state. It is written to a temporary file and moved into
place, so a crash never leaves a torn checkpoint and the previous one survives. `path + ".json"`
repeats the JSON state for people and tools; loading reads the copy inside the file.
"""
import json
import os

import numpy as np

from fastlora.io import _refuse_pickle, save_safetensors, write_json_atomic

FORMAT = 1
_META_KEY = "fastlora_checkpoint"


def write_checkpoint(path, model_arrays, optimizer_arrays, state):
    """Write the arrays and the JSON `state` to `path` atomically, then the sidecar."""
    arrays = {f"model.{k}": np.ascontiguousarray(v) for k, v in model_arrays.items()}
    arrays.update({f"optimizer.{k}": v for k, v in optimizer_arrays.items()})
    state = {"format": FORMAT, **state}
    text = json.dumps(state, allow_nan=True)  # losses of skipped steps are NaN
    save_safetensors(path, arrays, metadata={_META_KEY: text})
    write_json_atomic(os.fspath(path) + ".json", state)


def read_checkpoint(path):
    """(model arrays, optimizer arrays, state) from a checkpoint file; never unpickles.

    Errors name the file: missing, a pickle, not safetensors (truncated or corrupt), not a
    fastlora checkpoint, or of an unknown format.
    """
    from safetensors import safe_open
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    with open(path, "rb") as fh:
        _refuse_pickle(path, fh.read(4))
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file
        raise ValueError(f"{path}: not a valid checkpoint (safetensors could not read it: {exc})") from None
    if _META_KEY not in meta:
        raise ValueError(f"{path}: a safetensors file but not a fastlora checkpoint "
                         f"(no {_META_KEY!r} metadata); load weights with GPT.load instead")
    try:
        state = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: checkpoint state is not valid JSON ({exc})") from None
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}; this version reads {FORMAT}")
    model = {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}
    optim = {k[len("optimizer."):]: v for k, v in arrays.items() if k.startswith("optimizer.")}
    return model, optim, state


def check_model_arrays(path, model, arrays):
    """Raise if `arrays` do not fit `model` exactly (names, shapes, dtypes): names the first
    mismatched parameter."""
    own = dict(model.named_parameters())
    for name, p in own.items():
        if name not in arrays:
            raise ValueError(f"{path}: checkpoint has no weight for parameter {name!r} "
                             f"(was it written for a different model?)")
        if arrays[name].shape != p.shape:
            raise ValueError(f"{path}: parameter {name!r} has shape {arrays[name].shape} in the "
                             f"checkpoint but {p.shape} in the model")
        if arrays[name].dtype != p.data.dtype:
            # resuming would silently continue in another precision (a float16 file into a
            # float32 model loses the low bits of every weight the run had)
            raise ValueError(f"{path}: parameter {name!r} is {arrays[name].dtype} in the checkpoint "
                             f"but {p.data.dtype} in the model; make the model in the checkpoint's dtype")
    extra = [k for k in arrays if k not in own]
    if extra:
        raise ValueError(f"{path}: checkpoint has parameters the model lacks, e.g. {extra[0]!r}")


def rng_generators(model):
    """[(module path, NumPy Generator)] of every module that owns one (dropout)."""
    return [(name, module.__dict__["rng"]) for name, module in model.named_modules()
            if isinstance(module.__dict__.get("rng"), np.random.Generator)]


def rng_states(model, generators=None):
    """{module path: bit-generator state} of every module that owns a NumPy Generator; pass
    rng_generators(model) as `generators` to skip walking the modules again (once per step)."""
    if generators is None:
        generators = rng_generators(model)
    return {name: rng.bit_generator.state for name, rng in generators}


def set_rng_states(model, states):
    modules = dict(model.named_modules())
    for name, state in states.items():
        rng = modules.get(name).__dict__.get("rng") if name in modules else None
        if isinstance(rng, np.random.Generator):
            rng.bit_generator.state = state
