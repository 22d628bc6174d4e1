"""Safe file I/O: safetensors for arrays, JSON for config, every write atomic, every read bounded.

Writes go to a temporary file in the target's folder and are moved into place with
os.replace, so a crash never leaves a torn file. Nothing here unpickles: loading never runs code.
Reads are sized before they are made: a safetensors header is parsed by hand and checked
against the file's real size (every tensor inside the file, its bytes matching its dtype and
shape, no two overlapping), a file whose claimed data is mostly holes (a sparse file) or larger
than the memory available is refused, and only then is any tensor read. Every error is one
FastloraError (a ValueError) naming the file.
"""
import json
import os
import tempfile

import numpy as np

from fastlora.errors import FastloraError, MissingFileError

_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container holds a pickle
TMP_PREFIX = ".tmp-"  # atomic_write's temporaries: .tmp-<random>-<target name>

HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own bound on a header
JSON_LIMIT = 512 * 1024 * 1024    # a config, tokenizer or adapter config larger than this is not one
_SPARSE_CHECK_FROM = 64 * 1024 * 1024  # smaller files are read whatever their holes
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
                "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def atomic_write(path, write_fn, mode="wb"):
    """Call write_fn(file) on a temporary file next to `path`, then move it over `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + os.path.basename(path), dir=folder)
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


def remove_stale_temporaries(folder, suffixes=None):
    """Delete the temporaries atomic_write left in `folder` when its process was killed; returns
    their paths. With `suffixes`, only those of targets with these names. Call it only where no
    other live process writes (the trainer holds the run folder's lock)."""
    folder = os.fspath(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        if not name.startswith(TMP_PREFIX):
            continue
        if suffixes is not None and not any(name.endswith("-" + s) for s in suffixes):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass  # not ours to worry about: it is only clutter
    return removed


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path, obj):
    atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"), mode="w")


def parse_json(text, where):
    """json.loads with one FastloraError naming `where` for bad or too deeply nested JSON."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FastloraError(f"{where}: not valid JSON ({exc})") from None
    except RecursionError:
        raise FastloraError(f"{where}: JSON nested too deeply to read") from None


def read_json(path, limit=JSON_LIMIT):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: no such file")
    size = os.path.getsize(path)
    if size > limit:
        raise FastloraError(f"{path}: {size:,} bytes, more than the {limit:,} a JSON file read here may have")
    with open(path, "rb") as fh:
        blob = fh.read()
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FastloraError(f"{path}: not valid JSON ({exc})") from None
    return parse_json(text, path)


def save_safetensors(path, arrays, metadata=None):
    """Write {name: ndarray} to `path` in safetensors format, atomically."""
    from safetensors.numpy import save
    blob = save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                metadata={k: str(v) for k, v in (metadata or {}).items()} or None)
    atomic_write(path, lambda fh: fh.write(blob))


def _refuse_pickle(path, head):
    if head.startswith(_PICKLE_MAGIC) or head.startswith(_ZIP_MAGIC):
        raise FastloraError(f"{path}: looks like a pickle or torch.save archive; fastlora only "
                            "loads safetensors and never unpickles (it could run code)")


def safetensors_header(path, kind="a valid safetensors file"):
    """(entries, metadata) of a safetensors file, read and checked by hand; no tensor data is read.

    entries: {name: {"dtype", "shape", "data_offsets": (start, end), "base": data start}}.
    Errors are FastloraErrors "<path>: not <kind> (...)".
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: no such file")

    def bad(detail):
        return FastloraError(f"{path}: not {kind} ({detail})")

    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        _refuse_pickle(path, head)
        if len(head) < 8:
            raise bad("shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > HEADER_LIMIT or 8 + n > size:
            raise bad(f"header length {n} does not fit the {size}-byte file")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"header is not JSON: {exc}") from None
    except RecursionError:
        raise bad("header JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise bad("header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ is not an object of strings")
    data_size = size - 8 - n
    entries = {}
    for name, info in header.items():
        try:
            start, end = (int(v) for v in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            dtype = str(info["dtype"])
        except (TypeError, KeyError, ValueError, AttributeError):
            raise bad(f"tensor {name!r} has a malformed header entry") from None
        if not 0 <= start <= end <= data_size or min(shape, default=0) < 0:
            raise bad(f"tensor {name!r} lies outside the file: offsets {start}..{end}, {data_size} data bytes")
        if dtype not in _DTYPE_BYTES:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        need = _DTYPE_BYTES[dtype] * int(np.prod(shape, dtype=object))
        if end - start != need:
            raise bad(f"tensor {name!r} holds {end - start} bytes, its {dtype} shape {tuple(shape)} needs {need}")
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": (start, end), "base": 8 + n}
    spans = sorted(e["data_offsets"] for e in entries.values())
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise bad("two tensors overlap in the file")
    return entries, metadata


def check_readable(path, nbytes):
    """Refuse to read `nbytes` of tensor data from `path` when the file is mostly holes (a sparse
    file claims data it does not hold) or when that much memory is not available."""
    path = os.fspath(path)
    check_not_sparse(path, nbytes)
    available = available_memory()
    if available is not None and nbytes > available:
        raise FastloraError(f"{path}: reading it needs {nbytes / 2**30:.1f} GiB, more than the "
                            f"{available / 2**30:.1f} GiB of memory available")


def check_not_sparse(path, nbytes):
    """Refuse a file that claims `nbytes` but is mostly holes on disk: even streamed, reading it
    would spend minutes on zeros that nobody wrote."""
    stored = getattr(os.stat(path), "st_blocks", None)
    if stored is not None and nbytes >= _SPARSE_CHECK_FROM and stored * 512 < nbytes // 16:
        raise FastloraError(f"{path}: claims {nbytes:,} bytes of data but holds only {stored * 512:,} on disk "
                            "(a sparse file); refusing to read it")


def available_memory():
    """Bytes of memory the process could still get (Linux: MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def read_tensors(path, names, kind="a valid safetensors file"):
    """{name: ndarray} for `names` of a file safetensors_header has checked. The library's errors,
    its Rust panics included (pyo3's PanicException is a BaseException), become one FastloraError."""
    from safetensors import safe_open
    path = os.fspath(path)
    try:
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in names}
    except BaseException as exc:  # noqa: BLE001 - a panic derives from BaseException only
        if not (isinstance(exc, Exception) or type(exc).__name__ == "PanicException") \
                or isinstance(exc, MemoryError):
            raise  # KeyboardInterrupt, SystemExit, MemoryError
        raise FastloraError(f"{path}: not {kind} (safetensors could not read it: {exc})") from None


def load_safetensors(path, finite=True):
    """Read {name: ndarray} from a safetensors file, sized first (see the module docstring). With
    `finite`, a floating tensor holding a NaN or an infinity is refused: fastlora's files hold
    weights, and a model with one NaN only ever computes NaN."""
    entries, _ = safetensors_header(path)
    check_readable(path, sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values()))
    arrays = read_tensors(path, list(entries))
    if finite:
        for name, a in arrays.items():
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise FastloraError(f"{path}: {name} holds NaN or infinite values")
    return arrays
