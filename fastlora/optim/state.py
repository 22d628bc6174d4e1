"""Split an optimizer or schedule state_dict into JSON and arrays, and join them back.

Checkpoints never pickle: the arrays (an optimizer's per-parameter buffers, under "state")
go to safetensors and everything else to a JSON sidecar.

    meta, arrays = split_state(optimizer.state_dict(), prefix="optimizer.")
    safetensors.numpy.save_file({**model_arrays, **arrays}, path)   # one file is fine
    json.dump(meta, fh)
    ...
    optimizer.load_state_dict(join_state(json.load(fh), safetensors.numpy.load_file(path),
                                         prefix="optimizer."))

`meta` records the array names it expects ("array_keys"), so join_state reports an array
missing from a truncated or foreign file by name instead of loading a partial state.
"""
import json

import numpy as np


def split_state(state_dict, prefix=""):
    """(meta: JSON-able dict, arrays: {prefix + name: C-contiguous ndarray}) from a state_dict.

    The arrays are the ones under state_dict["state"] (absent for a schedule); the rest must be
    plain JSON data, and is returned as a deep copy. prefix lets the arrays share one
    safetensors file with other arrays (the model's weights).
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    if "array_keys" in state_dict:
        raise ValueError("state_dict already has an 'array_keys' entry; split_state adds it")
    raw = state_dict.get("state", {})
    if not isinstance(raw, dict):
        raise TypeError(f"state_dict['state'] must be a dict of arrays, got {type(raw).__name__}")
    arrays = {}
    for name, value in raw.items():
        if not isinstance(name, str):
            raise TypeError(f"state_dict['state'] key {name!r} must be a str")
        if not isinstance(value, np.ndarray):
            raise TypeError(f"state_dict['state'][{name!r}] must be a numpy.ndarray, "
                            f"got {type(value).__name__}")
        arrays[prefix + name] = np.ascontiguousarray(value)
    meta = {k: v for k, v in state_dict.items() if k != "state"}
    try:
        # a round trip both deep-copies and proves the rest is JSON (no arrays, no objects)
        meta = json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"state_dict has a value that is not plain JSON data: {exc}") from None
    if "state" in state_dict:
        meta["array_keys"] = sorted(raw)
    return meta, arrays


def join_state(meta, arrays, prefix=""):
    """The state_dict that split_state(meta, arrays) came from (arrays are not copied).

    arrays may hold other entries (keys without the prefix, or not listed in meta); they are
    ignored. A listed array that is missing is an error naming it.
    """
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    if not isinstance(arrays, dict):
        raise TypeError(f"arrays must be a dict of name -> ndarray, got {type(arrays).__name__}")
    state_dict = {k: v for k, v in meta.items() if k != "array_keys"}
    names = meta.get("array_keys")
    if names is None:
        return state_dict
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"meta['array_keys'] must be a list of str, got {names!r:.80}")
    state = {}
    for name in names:
        key = prefix + name
        if key not in arrays:
            raise KeyError(f"array {key!r} listed in meta['array_keys'] is missing from arrays")
        value = arrays[key]
        if not isinstance(value, np.ndarray):
            raise TypeError(f"arrays[{key!r}] must be a numpy.ndarray, got {type(value).__name__}")
        state[name] = value
    state_dict["state"] = state
    return state_dict
