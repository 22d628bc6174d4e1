"""Reading a Hugging Face model folder: config.json and safetensors weights, single or sharded.

    <folder>/config.json                      model_type and the architecture's sizes
    <folder>/model.safetensors                 the weights, or
    <folder>/model.safetensors.index.json      {"weight_map": {tensor name: shard file}} + shards

Tensors are opened lazily (safetensors' safe_open), so names, shapes and dtypes are checked
against the model before any data is read: a file whose header claims huge tensors costs
nothing until it has passed those checks. Half-precision weights are widened as they are
read. Pickled checkpoints (pytorch_model.bin, *.pt, *.ckpt) are refused, never opened.
"""
import os

import numpy as np

from fastlora.io import (check_readable, read_json, read_tensors, safetensors_header, save_safetensors,
                         write_json_atomic)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


def read_config(folder):
    """config.json of a model folder as a dict; FileNotFoundError/ValueError naming the path."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME}; a Hugging Face model folder holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME} (or {INDEX_NAME} and its shards)")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


class WeightFiles:
    """The tensors of a model folder: names, shapes and dtypes up front, data on request."""

    def __init__(self, folder):
        self.folder = os.fspath(folder)
        self._where = {}  # tensor name -> file path
        self._meta = {}   # tensor name -> (safetensors dtype, shape)
        single = os.path.join(self.folder, WEIGHTS_NAME)
        index = os.path.join(self.folder, INDEX_NAME)
        if os.path.isfile(index):
            self._read_index(index)
        elif os.path.isfile(single):
            self._meta = _header(single)
            self._where = dict.fromkeys(self._meta, single)
        else:
            pickled = [n for n in PICKLE_NAMES if os.path.exists(os.path.join(self.folder, n))]
            if pickled:
                raise ValueError(
                    f"{os.path.join(self.folder, pickled[0])}: a pickled PyTorch checkpoint; fastlora "
                    "never unpickles (it can run code). Convert it once where you trust it: "
                    "transformers.AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder) "
                    f"writes {WEIGHTS_NAME}")
            raise FileNotFoundError(f"{self.folder}: no {WEIGHTS_NAME} or {INDEX_NAME}")

    def _read_index(self, index):
        raw = read_json(index)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: expected a JSON object with a non-empty 'weight_map'")
        for name, shard in weight_map.items():
            # a shard is a file beside the index: no folders, so an index cannot reach elsewhere
            if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise ValueError(f"{index}: weight_map[{name!r}] = {shard!r} is not a file name in the folder")
            path = os.path.join(self.folder, shard)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{index}: names shard {shard!r} (for {name!r}), which is missing")
            self._where[name] = path
        headers = {path: _header(path) for path in sorted(set(self._where.values()))}
        for name, path in self._where.items():
            if name not in headers[path]:
                raise ValueError(f"{index}: says {name!r} is in {os.path.basename(path)}, which does not hold it")
            self._meta[name] = headers[path][name]

    def names(self):
        return list(self._meta)

    def check_holds(self, config, where):
        """Refuse a config.json that describes far more weights than the files hold, before a model
        of its size is allocated (a hostile config cannot claim a vocabulary of 10**9). Smaller
        mismatches pass, to be named tensor by tensor once the model is built."""
        needed = config.num_parameters()
        held = sum(int(np.prod(shape, dtype=np.int64)) for _, shape in self._meta.values())
        if needed > 2 * held:
            raise ValueError(f"{where}: describes a model of {needed:,} weights, but {self.folder} holds "
                             f"{held:,}; the config and the weights do not belong together")

    def shape(self, name):
        return self._meta[name][1]

    def read(self, name, dtype):
        """Tensor `name` as a new `dtype` array (F16/BF16/F32/F64 stored)."""
        stored, shape = self._meta[name]
        path = self._where[name]
        if stored == "BF16":  # NumPy has no bfloat16: the high half of a float32
            raw = _raw_bytes(path, name).view("<u2").astype(np.uint32) << 16
            return raw.view(np.float32).reshape(shape).astype(dtype)
        if stored not in ("F16", "F32", "F64"):
            raise ValueError(f"{path}: {name} has dtype {stored}; model weights must be floating "
                             "(F16, BF16, F32 or F64)")
        return np.asarray(read_tensors(path, [name], kind="a safetensors file")[name], dtype=dtype)


def _header(path):
    """{name: (dtype, shape)} from a safetensors header, read and bounded by hand (no data read);
    a sparse file, or one larger than the memory available, is refused here."""
    entries = _header_json(path)
    check_readable(path, sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values()))
    return {name: (info["dtype"], tuple(info["shape"])) for name, info in entries.items()}


def _header_json(path):
    """The checked header entries of one safetensors file (fastlora.io.safetensors_header)."""
    return safetensors_header(path, kind="a safetensors file")[0]


def _raw_bytes(path, name):
    info = _header_json(path)[name]
    start, end = info["data_offsets"]
    count = int(np.prod(info["shape"], dtype=np.int64))
    if end - start != 2 * count:
        raise ValueError(f"{path}: tensor {name!r} holds {end - start} bytes, its shape needs {2 * count}")
    with open(path, "rb") as fh:
        fh.seek(info["base"] + start)
        return np.frombuffer(fh.read(end - start), dtype=np.uint8)


def save_folder(folder, tensors, config):
    """Write model.safetensors and config.json as transformers' save_pretrained does (both atomic)."""
    folder = os.fspath(folder)
    save_safetensors(os.path.join(folder, WEIGHTS_NAME), tensors, metadata={"format": "pt"})
    write_json_atomic(os.path.join(folder, CONFIG_NAME), config)


def load_state(model, files, names, architecture, canonical=lambda n: n, ignore=lambda n: False,
               transposed=lambda n: False, tied=None):
    """Read a model folder's tensors (a WeightFiles) into `model`, every name and shape checked
    before any data is read.

    names: [(stored name, [parameter names])]; a stored tensor of several parameters is split
    along its first axis (after the transpose that `transposed(stored name)` asks for).
    canonical maps a file's name to the stored name (dropping a prefix); `ignore` names buffers
    that are not weights; `tied` {stored name: parameter} lists tensors a tied model may carry
    anyway (checked against that parameter's shape, then not used).
    """
    folder = files.folder
    stored = {}
    for name in files.names():
        key = canonical(name)
        if ignore(key):
            continue
        if key in stored:
            raise ValueError(f"{folder}: tensor {key!r} is stored twice (as {stored[key]!r} and {name!r})")
        stored[key] = name
    tied = {k: v for k, v in (tied or {}).items() if k in stored}
    missing = [hf for hf, _ in names if hf not in stored]
    extra = sorted(set(stored) - {hf for hf, _ in names} - set(tied))
    if missing or extra:
        parts = [f"missing {_few(missing)}"] * bool(missing) + [f"unexpected {_few(extra)}"] * bool(extra)
        raise ValueError(f"{folder}: the weights do not match a {architecture} of this config.json: "
                         + "; ".join(parts))
    own = dict(model.named_parameters())
    shapes = {key: own[param].shape for key, param in tied.items()}
    for hf, dst in names:
        parts = [own[n].shape for n in dst]
        shape = (sum(p[0] for p in parts),) + tuple(parts[0][1:])
        shapes[hf] = shape[::-1] if transposed(hf) else shape
    for hf, shape in shapes.items():
        if files.shape(stored[hf]) != shape:
            raise ValueError(f"{folder}: tensor {stored[hf]!r} has shape {files.shape(stored[hf])}, "
                             f"this config.json needs {shape}")
    state = {}
    for hf, dst in names:
        array = files.read(stored[hf], model.dtype)
        if transposed(hf):
            array = array.T
        for name, part in zip(dst, np.split(array, len(dst), axis=0)):
            state[name] = part
    bad = next((n for n, a in state.items() if not np.all(np.isfinite(a))), None)
    if bad is not None:
        raise ValueError(f"{folder}: the weights of {bad} hold NaN or infinite values")
    model.load_state_dict(state)


def _few(names):
    return f"{names[:4]}{f' and {len(names) - 4} more' if len(names) > 4 else ''}"
