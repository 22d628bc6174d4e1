"""Safe file I/O: safetensors for arrays, JSON for config, every write atomic.

Writes go to a temporary file in the target's folder and are moved into place with
os.replace, so a crash never leaves a torn file. Nothing here unpickles: loading never runs code.
"""
import json
import os
import tempfile

import numpy as np

_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container holds a pickle


def atomic_write(path, write_fn, mode="wb"):
    """Call write_fn(file) on a temporary file next to `path`, then move it over `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, mode) as fh:
            write_fn(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path, obj):
    atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"), mode="w")


def read_json(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def save_safetensors(path, arrays, metadata=None):
    """Write {name: ndarray} to `path` in safetensors format, atomically."""
    from safetensors.numpy import save
    blob = save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                metadata={k: str(v) for k, v in (metadata or {}).items()} or None)
    atomic_write(path, lambda fh: fh.write(blob))


def _refuse_pickle(path, head):
    if head.startswith(_PICKLE_MAGIC) or head.startswith(_ZIP_MAGIC):
        raise ValueError(f"{path}: looks like a pickle or torch.save archive; fastlora only "
                         "loads safetensors and never unpickles (it could run code)")


def load_safetensors(path):
    """Read {name: ndarray} from a safetensors file, with clear errors for anything else."""
    from safetensors import SafetensorError
    from safetensors.numpy import load
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as fh:
        blob = fh.read()
    _refuse_pickle(path, blob[:4])
    try:
        return load(blob)
    except (SafetensorError, ValueError, Exception) as exc:  # noqa: BLE001 - any parse failure
        raise ValueError(f"{path}: not a valid safetensors file ({exc})") from None
