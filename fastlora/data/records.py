"""Loading and checking instruction records (Alpaca format), and train_test_split.

A record is {"instruction": str, "input": str (optional, default ""), "output": str}; other
keys (ids, sources, ...) are ignored. Records come from a list of dicts, a .json file holding a list
of objects, or a .jsonl file with one object per line (blank lines skipped).

Every problem is a ValueError (FileNotFoundError for a missing file) that names the file,
the line or record index and the field. Everything is checked before anything is returned,
so a bad record never leaves a half-loaded dataset behind.
"""
import json
import os

import numpy as np

REQUIRED = ("instruction", "output")
OPTIONAL = ("input",)


def load_records(source):
    """-> list of {"instruction", "input", "output"} dicts from a list or a .json / .jsonl path."""
    if isinstance(source, (str, os.PathLike)):
        return _load_file(os.fspath(source))
    if isinstance(source, (list, tuple)):
        return check_records(source, where="data")
    raise TypeError(f"data must be a list of dicts or a path to a .json / .jsonl file, "
                    f"got {type(source).__name__}")


def check_records(items, where, lines=None):
    """Validate records; `lines[i]` (when given) is record i's line number for messages."""
    if len(items) == 0:
        raise ValueError(f"{where}: empty dataset (no records)")
    records = []
    for i, item in enumerate(items):
        at = f"{where}: record {i}" + (f" (line {lines[i]})" if lines is not None else "")
        if not isinstance(item, dict):
            raise ValueError(f"{at} is a {_json_type(item)}, expected an object with "
                             f"'instruction' and 'output'")
        for field in REQUIRED:
            if field not in item:
                raise ValueError(f"{at}: missing required field {field!r}")
        record = {}
        for field in REQUIRED + OPTIONAL:
            value = item.get(field, "")
            if not isinstance(value, str):
                raise ValueError(f"{at}: field {field!r} must be a string, got "
                                 f"{_json_type(value)} {_preview(value)}")
            record[field] = value
        records.append(record)
    return records


def _load_file(path):
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".jsonl"):
        raise ValueError(f"{path}: unsupported file type {ext!r}; use .json (a list of objects) "
                         f"or .jsonl (one object per line)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, expected a {ext} file")
    with open(path, "rb") as fh:
        blob = fh.read()
    try:
        text = blob.decode("utf-8-sig")  # tolerate the BOM some editors write
    except UnicodeDecodeError as exc:
        line = blob[:exc.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not valid UTF-8 (byte {exc.start}: "
                         f"{exc.reason})") from None
    if ext == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg}, "
                             f"column {exc.colno})") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: a .json dataset must hold a list of objects, got a "
                             f"{_json_type(items)}")
        return check_records(items, where=path)
    items, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {number}: not valid JSON ({exc.msg}, column "
                             f"{exc.colno})") from None
        lines.append(number)
    return check_records(items, where=path, lines=lines)


def _json_type(value):
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _preview(value):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def train_test_split(data, test_size=0.1, seed=0, shuffle=True):
    """Split records (a list or a .json / .jsonl path) into (train, test) lists of records.

    test_size is a fraction in (0, 1) (rounded up, as scikit-learn does) or a count. Both
    parts must be non-empty. The same seed gives the same split.
    """
    records = load_records(data)
    n = len(records)
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)):
        raise TypeError(f"test_size must be a fraction or a count, got {test_size!r}")
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"test_size as a fraction must be in (0, 1), got {test_size}")
        n_test = int(np.ceil(test_size * n))
    else:
        n_test = test_size
    if not 1 <= n_test <= n - 1:
        raise ValueError(f"test_size={test_size!r} gives {n_test} test records out of {n}; "
                         f"both parts need at least one")
    if shuffle:
        test = set(np.random.default_rng(seed).permutation(n)[:n_test].tolist())
    else:
        test = set(range(n - n_test, n))  # the last records, as scikit-learn does
    # each part keeps the original record order, so a split is easy to inspect
    return ([r for i, r in enumerate(records) if i not in test],
            [r for i, r in enumerate(records) if i in test])
