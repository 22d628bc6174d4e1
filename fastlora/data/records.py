"""Loading and checking records (Alpaca, chat, ShareGPT or text), and train_test_split.

The formats and their canonical form are in fastlora/data/formats.py; the sources (a list of
dicts, a .json file holding a list of objects, a .jsonl file with one object per line, a
.parquet file) in sources.py. load_records reads them all into memory; FinetuneDataset
streams a file instead.

Every problem is a ValueError (FileNotFoundError for a missing file) that names the file,
the line or record index and the field. Everything is checked before anything is returned,
so a bad record never leaves a half-loaded dataset behind.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from fastlora.data.formats import RecordReader
from fastlora.data.sources import open_source


def load_records(source, field_map=None):
    """-> list of canonical records ({"instruction", "input", "output"}, {"messages"} or
    {"text"}) from a list or a .json / .jsonl / .parquet path."""
    source = open_source(source, RecordReader(field_map))
    records = [record for chunk in source.chunks(1000) for _, _, record, _ in chunk]
    if not records:
        raise ValueError(f"{getattr(source, 'path', None) or getattr(source, 'where', 'data')}: "
                         f"empty dataset (no records)")
    return records


def train_test_split(data: Any, test_size: float = 0.1, seed: int = 0, shuffle: bool = True,
                     field_map: Optional[Dict[str, str]] = None) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Split records (a list or a .json / .jsonl / .parquet path) into (train, test) lists of records.

    test_size is a fraction in (0, 1) (rounded up, as scikit-learn does) or a count. Both
    parts must be non-empty. The same seed gives the same split.
    """
    records = load_records(data, field_map)
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
