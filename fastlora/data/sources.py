"""Where records come from: a list, a .json array, a .jsonl file or a Parquet file, read in chunks.

    source = open_source("data.jsonl", reader)     # reader: a formats.RecordReader
    for chunk in source.chunks(1000):              # [(index, at, canonical record, locator)]
        ...
    source.record(locator)                         # one record again, read back from the file

A .jsonl file streams: it is read a line at a time and handed on a chunk of records at a
time, so memory holds one chunk, never the file; each record's byte offset is its locator,
so a dataset can read a record back later without keeping it. A Parquet file streams by
record batches (pyarrow, `pip install 'fastlora[parquet]'`), reading only the columns its
format needs; its locator is the row. A .json file is one array and is read whole (use
JSONL for large data). A list's locator is the record itself.

Errors are ValueErrors naming the file, the record (and line) and the field; a missing file
is a FileNotFoundError.
"""
import json
import os

from fastlora.data.formats import json_type
from fastlora.io import available_memory, check_not_sparse

EXTENSIONS = (".json", ".jsonl", ".parquet")


def open_source(data, reader):
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        ext = os.path.splitext(path)[1].lower()
        if ext not in EXTENSIONS:
            raise ValueError(f"{path}: unsupported file type {ext!r}; use .json (a list of objects), "
                             f".jsonl (one object per line) or .parquet")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file")
        if os.path.isdir(path):
            raise ValueError(f"{path}: is a directory, expected a {ext} file")
        check_not_sparse(path, os.path.getsize(path))
        return {".json": JSONSource, ".jsonl": JSONLSource, ".parquet": ParquetSource}[ext](path, reader)
    if isinstance(data, (list, tuple, LazyRecords)):  # LazyRecords: another dataset's `records`
        return ListSource(data, reader)
    raise TypeError(f"data must be a list of dicts or a path to a .json / .jsonl / .parquet file, "
                    f"got {type(data).__name__}")


class ListSource:
    """Records already in memory (a list, or a .json file's array)."""

    lazy = False

    def __init__(self, items, reader, where="data"):
        self.items, self.reader, self.where = items, reader, where
        self.size, self.unit = len(items), "records"

    def _at(self, i):
        return f"{self.where}: record {i}"

    def chunks(self, n, progress=None):
        for start in range(0, len(self.items), n):
            chunk = []
            for i, item in enumerate(self.items[start:start + n], start):
                record = self.reader.canonical(item, self._at(i))
                chunk.append((i, self._at(i), record, record))  # a record in memory is its own locator
            if progress is not None:
                progress.update(len(chunk))
            yield chunk

    def record(self, locator):
        return locator


class JSONSource(ListSource):
    def __init__(self, path, reader):
        with open(path, "rb") as fh:
            text = _decode(fh.read(), path, 1, 0)
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg}, "
                             f"column {exc.colno})") from None
        except RecursionError:
            raise ValueError(f"{path}: JSON nested too deeply") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: a .json dataset must hold a list of objects, got a "
                             f"{json_type(items)}")
        super().__init__(items, reader, where=path)


class JSONLSource:
    """One JSON object per line, read a line at a time (blank lines skipped, a BOM tolerated)."""

    lazy = True

    def __init__(self, path, reader):
        self.path, self.reader = path, reader
        self.size, self.unit = os.path.getsize(path), "B"

    def chunks(self, n, progress=None):
        chunk, index, offset = [], 0, 0
        # a line is held whole while it is parsed: one longer than a quarter of the memory left
        # (a file of holes, a missing newline) is refused instead of swapping the machine to death
        limit = max(1 << 20, (available_memory() or 1 << 62) // 4)
        number = 0
        with open(self.path, "rb") as fh:
            while True:  # not `for ... in enumerate(fh)`: enumerate's reused tuple would keep the line alive
                line = fh.readline(limit)
                if not line:
                    break
                number += 1
                if len(line) == limit and not line.endswith(b"\n"):
                    raise ValueError(f"{self.path}: line {number} is longer than {limit:,} bytes, a quarter "
                                     f"of the memory available; is the file JSONL (one object per line)?")
                start, offset = offset, offset + len(line)
                if progress is not None:
                    progress.update(len(line))
                if number == 1 and line.startswith(b"\xef\xbb\xbf"):  # the BOM some editors write
                    line, start = line[3:], start + 3
                if not line.strip():
                    continue
                at = f"{self.path}: record {index} (line {number})"
                # a long line is held twice at most: as bytes and text, then as text and its value
                text = _decode(line, self.path, number, start)
                del line
                item = _parse(text, self.path, number)
                del text
                chunk.append((index, at, self.reader.canonical(item, at), start))
                del item
                index += 1
                if len(chunk) >= n:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk

    def record(self, offset):
        """The canonical record whose line starts at byte `offset`."""
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            line = fh.readline()
        return self.reader.canonical(_parse_line(line, self.path, None, offset), f"{self.path} at byte {offset}")


def _decode(blob, path, first_line, first_byte):
    try:
        return blob.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = first_line + blob[:exc.start].count(b"\n") if first_line else "?"
        raise ValueError(f"{path}: line {line}: not valid UTF-8 (byte {first_byte + exc.start}: "
                         f"{exc.reason})") from None


def _parse_line(line, path, number, offset):
    return _parse(_decode(line, path, number, offset), path, number)


def _parse(text, path, number):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {number}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"{path}: line {number}: JSON nested too deeply") from None


def require_pyarrow(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading Parquet needs pyarrow: pip install 'fastlora[parquet]'") from None
    return pq


class ParquetSource:
    """A Parquet file, streamed by record batches; only the columns of its format are read."""

    lazy = True

    def __init__(self, path, reader):
        pq = require_pyarrow(path)
        self.path, self.reader = path, reader
        try:
            self.file = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises its own ArrowInvalid etc.
            raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
        names = self.file.schema_arrow.names
        kind = reader.kind(dict.fromkeys(names))  # the columns decide the format, as keys do
        if kind is None:
            raise ValueError(f"{path}: no columns of a known format{_mapped(reader, None)}: expected "
                             f"{reader.name['instruction']!r} + {reader.name['output']!r} (Alpaca), "
                             f"{reader.name['messages']!r} (chat), {reader.name['conversations']!r} "
                             f"(ShareGPT) or {reader.name['text']!r}; its columns are {names}")
        required, optional = reader.columns(kind)
        missing = [c for c in required if c not in names]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} for its {kind} "
                             f"records{_mapped(reader, missing)}; its columns are {names}")
        self.columns = required + [c for c in optional if c in names]
        self.size, self.unit = self.file.metadata.num_rows, "records"
        self._group_starts = [0]
        for g in range(self.file.num_row_groups):
            self._group_starts.append(self._group_starts[-1] + self.file.metadata.row_group(g).num_rows)
        self._cached = (None, None)

    def chunks(self, n, progress=None):
        index = 0
        for batch in self.file.iter_batches(batch_size=n, columns=self.columns):
            chunk = []
            for item in batch.to_pylist():
                at = f"{self.path}: record {index} (row {index})"
                chunk.append((index, at, self.reader.canonical(item, at), index))
                index += 1
            if progress is not None:
                progress.update(len(chunk))
            yield chunk

    def record(self, row):
        import bisect
        group = bisect.bisect_right(self._group_starts, row) - 1
        if self._cached[0] != group:  # records are read back in order: keep one row group
            self._cached = (group, self.file.read_row_group(group, columns=self.columns))
        item = self._cached[1].slice(row - self._group_starts[group], 1).to_pylist()[0]
        return self.reader.canonical(item, f"{self.path}: row {row}")


def _mapped(reader, missing):
    mapped = {theirs: ours for ours, theirs in reader.field_map.items() if missing is None or theirs in missing}
    if not mapped:
        return ""
    return " (field_map maps " + ", ".join(f"{ours!r} to {theirs!r}" for theirs, ours in mapped.items()) + ")"


class LazyRecords:
    """The kept records of a streamed file, read back one at a time from their locators."""

    def __init__(self, source, locators):
        self._source, self._locators = source, locators

    def __len__(self):
        return len(self._locators)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self._source.record(int(self._locators[i]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self):
        return f"LazyRecords({len(self)} records read back from {self._source.path})"
