"""Manifest record sources, one per format: ``(row, record or problem, cells are CSV text)``.

Each reads its file a line or a Parquet record batch at a time, never whole; ``row`` is the
1-based line number (CSV: the physical line a record starts on; Parquet: row number + 1).
A record a source cannot parse comes as a ``RowProblem`` for that row; a file it cannot read
at all raises ``ManifestError``.

Sizes are checked before the work they would cost (issue 20): a line longer than
``FARM_BULK_MAX_LINE_BYTES`` is skipped unread (a problem for its row), JSON nested deeper than
``MAX_DEPTH`` is a problem, not a RecursionError, and a Parquet file is refused at open when its
metadata shows a row group larger than ``FARM_BULK_MAX_PARQUET_ROW_GROUP_BYTES`` uncompressed or more
rows than ``FARM_BULK_MAX_MANIFEST_ROWS``. Its text columns are read dictionary-encoded, as they are
stored, and each row's text is measured before it is decoded: a few bytes of file can repeat one long
value in every row, and a row over ``FARM_BULK_MAX_LINE_BYTES`` is a problem for that row, never
decoded. A Parquet file that cannot be read past some row is a ``ManifestError`` for that row (the job
fails with it: what follows is unknown).
"""

from __future__ import annotations

import csv
import importlib
import json
import logging
import re
from collections.abc import Callable, Generator
from pathlib import Path
from typing import IO, Any

from farm.bulk import arrow
from farm.config import Settings
from farm.errors import InvalidInputError

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".csv", ".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 256
_ROW_PREFIX = re.compile(r"^row (\d+): ")
MAX_DEPTH = 32  # JSON nesting a record may have: deeper is no prompt's metadata, only an attack


class ManifestError(InvalidInputError):
    """Raised when a manifest cannot be read, or (strict) for its first bad row."""

    def __init__(self, message: str, row: int | None = None) -> None:
        # one arg, the message, so the error survives a Celery round trip
        Exception.__init__(self, message)
        self.field = "manifest"
        self.reason = message
        if row is None and (m := _ROW_PREFIX.match(message)):
            row = int(m.group(1))
        self.row = row


class RowProblem(Exception):
    """A bad row; the argument is ``"<field>: <reason>"``."""


Record = tuple[int, dict[str, Any] | RowProblem, bool]
Records = Generator[Record, None, None]


def _too_long(what: str, limit: int) -> RowProblem:
    return RowProblem(f"input: the {what} is longer than {limit} bytes (FARM_BULK_MAX_LINE_BYTES)")


def _open_error(path: Path, exc: OSError) -> ManifestError:
    return ManifestError(f"{path.name}: cannot read the manifest: {exc.strerror or exc}")


def _lines(path: Path, limit: int) -> Generator[tuple[int, str | RowProblem], None, None]:
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise _open_error(path, exc) from None
    with fh:
        row = 0
        while raw := fh.readline(limit + 1):
            row += 1
            if len(raw) > limit and not raw.endswith(b"\n"):  # never held whole: skipped a block at a time
                while (more := fh.readline(limit)) and not more.endswith(b"\n"):
                    pass
                yield row, _too_long("line", limit)
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield row, RowProblem("input: not valid UTF-8")
                continue
            yield row, (line.removeprefix("\ufeff") if row == 1 else line).strip()


def _txt_records(path: Path, settings: Settings) -> Records:
    for row, line in _lines(path, settings.bulk_max_line_bytes):
        if isinstance(line, RowProblem):
            yield row, line, False
        elif line and not line.startswith("#"):
            yield row, {"prompt": line}, False


def depth(value: Any) -> int:
    """How deeply ``value`` nests lists and dicts (iterative: a deep value cannot exhaust the stack)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level + 1)
            if deepest > MAX_DEPTH:
                return deepest
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _jsonl_records(path: Path, settings: Settings) -> Records:
    for row, line in _lines(path, settings.bulk_max_line_bytes):
        if isinstance(line, RowProblem):
            yield row, line, False
            continue
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            yield row, RowProblem(f"input: invalid JSON ({exc})"), False
            continue
        except RecursionError:  # deeper than the parser's stack allows
            yield row, RowProblem(f"input: JSON nested more than {MAX_DEPTH} levels deep"), False
            continue
        if depth(obj) > MAX_DEPTH:
            yield row, RowProblem(f"input: JSON nested more than {MAX_DEPTH} levels deep"), False
            continue
        if isinstance(obj, dict):
            yield row, obj, False
        else:
            yield row, RowProblem(f"input: expected a JSON object, got {type(obj).__name__}"), False


class _LineTooLong(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


class _CappedLines:
    """A CSV file's physical lines for ``csv.reader``, each at most ``limit`` bytes: a longer one is never
    held whole (skipped a block at a time) and raises :class:`_LineTooLong`; reading goes on after it."""

    def __init__(self, fh: IO[bytes], limit: int) -> None:
        self.fh, self.limit, self.line = fh, limit, 0

    def __iter__(self) -> _CappedLines:
        return self

    def __next__(self) -> str:
        raw = self.fh.readline(self.limit + 1)
        if not raw:
            raise StopIteration
        self.line += 1
        if len(raw) > self.limit and not raw.endswith(b"\n"):
            while (more := self.fh.readline(self.limit)) and not more.endswith(b"\n"):
                pass
            raise _LineTooLong(self.line)
        text = raw.decode("utf-8")  # UnicodeDecodeError: the caller's
        return text.removeprefix("\ufeff") if self.line == 1 else text


def _csv_records(path: Path, settings: Settings) -> Records:
    """Rows of a CSV file with a header; a row whose line passes ``FARM_BULK_MAX_LINE_BYTES`` is rejected
    unread, as in the other text formats (the csv module alone would read any line whole)."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise _open_error(path, exc) from None
    limit = settings.bulk_max_line_bytes
    with fh:
        lines = _CappedLines(fh, limit)
        header: list[str] | None = None
        consumed = 0  # physical lines read so far
        while True:
            reader = csv.reader(lines)  # a new one after a line too long: the record it cut is dropped
            try:
                for cells in reader:
                    start, consumed = consumed + 1, lines.line
                    if not any(c.strip() for c in cells):
                        continue
                    if header is None:
                        header = [c.strip() for c in cells]
                        if "prompt" not in header:
                            raise ManifestError(f"row {start}: the CSV header has no 'prompt' column", start)
                        dupes = sorted({h for h in header if h and header.count(h) > 1})
                        if dupes:
                            raise ManifestError(f"row {start}: the CSV header repeats {', '.join(dupes)}", start)
                        continue
                    if len(cells) > len(header):
                        problem = RowProblem(f"input: {len(cells)} fields, but the header has {len(header)}")
                        yield start, problem, True
                        continue
                    if sum(len(c) for c in cells) > limit:  # a quoted record over many lines
                        yield start, _too_long("row", limit), True
                        continue
                    yield start, {k: v for k, v in zip(header, cells, strict=False) if k}, True
                break
            except _LineTooLong as exc:
                if header is None:
                    raise ManifestError(f"row {exc.line}: the CSV header is longer than {limit} bytes",
                                        exc.line) from None
                consumed = exc.line
                yield exc.line, _too_long("line", limit), True
            except csv.Error as exc:
                raise ManifestError(f"row {consumed + 1}: input: {exc}", consumed + 1) from None
            except UnicodeDecodeError:
                raise ManifestError(f"row {consumed + 1}: input: not valid UTF-8", consumed + 1) from None
    if header is None:
        raise ManifestError(f"{path.name}: empty CSV; expected a header row with a 'prompt' column")


def _parquet_records(path: Path, settings: Settings) -> Records:
    """Checked now, from the file's metadata (its footer), before a row is read; read as it is consumed."""
    pa, pq = arrow.pyarrow(), arrow.parquet()

    try:
        texts = [c.path for c in pq.ParquetFile(path).schema if c.physical_type == "BYTE_ARRAY"]
        pf = pq.ParquetFile(path, read_dictionary=texts)  # decoded row by row, after measuring (below)
    except (OSError, pa.ArrowException) as exc:
        log.info("%s: cannot read as Parquet: %s", path, exc)
        raise ManifestError(f"{path.name}: cannot read as Parquet (not Parquet, corrupt or truncated)") from None
    try:
        if "prompt" not in pf.schema_arrow.names:
            raise ManifestError(f"{path.name}: the Parquet file has no 'prompt' column")
        meta = pf.metadata
        if meta.num_rows > settings.bulk_max_manifest_rows:
            raise ManifestError(f"{path.name}: {meta.num_rows} rows; at most {settings.bulk_max_manifest_rows} "
                                "(FARM_BULK_MAX_MANIFEST_ROWS)")
        for i in range(meta.num_row_groups):
            group = meta.row_group(i)
            size = max(group.total_byte_size,
                       sum(group.column(c).total_uncompressed_size for c in range(group.num_columns)))
            if size > settings.bulk_max_parquet_row_group_bytes:
                raise ManifestError(f"{path.name}: row group {i} holds {size} bytes uncompressed; at most "
                                    f"{settings.bulk_max_parquet_row_group_bytes} "
                                    "(FARM_BULK_MAX_PARQUET_ROW_GROUP_BYTES)")
    except BaseException:
        pf.close()
        raise
    return _parquet_rows(path, pf, pa, settings.bulk_max_line_bytes)


def _text_bytes(batch: Any, pa: Any) -> list[int]:
    """Bytes of text each row of a batch holds in its top-level text columns, measured without decoding
    a dictionary (its values' lengths, taken by the rows' indices)."""
    pc = importlib.import_module("pyarrow.compute")
    total = pa.array([0] * batch.num_rows, pa.int64())
    for col in batch.columns:
        if pa.types.is_dictionary(col.type) and _is_text(pa, col.type.value_type):
            lengths = pc.binary_length(col.dictionary).take(col.indices)
        elif _is_text(pa, col.type):
            lengths = pc.binary_length(col)
        else:
            continue
        total = pc.add(total, pc.cast(lengths.fill_null(0), pa.int64()))
    return [int(n) for n in total.to_pylist()]


def _is_text(pa: Any, kind: Any) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
                or pa.types.is_large_binary(kind))


def _parquet_rows(path: Path, pf: Any, pa: Any, limit: int) -> Records:
    row = 0
    try:
        batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS)
        while True:
            try:
                batch = next(batches, None)
                if batch is None:
                    return
                sizes = _text_bytes(batch, pa)
                fits = [n <= limit for n in sizes]
                records = iter(batch.filter(pa.array(fits)).to_pylist())
            except (OSError, pa.ArrowException) as exc:
                log.info("%s: cannot read past row %d: %s", path, row, exc)
                raise ManifestError(f"row {row + 1}: input: the Parquet file cannot be read from this row on "
                                    "(corrupt or truncated)", row + 1) from None
            for size, fit in zip(sizes, fits, strict=True):
                row += 1
                if fit:
                    yield row, next(records), False
                else:
                    yield row, RowProblem(f"input: the row holds {size} bytes of text; at most {limit} "
                                          "(FARM_BULK_MAX_LINE_BYTES)"), False
    finally:
        pf.close()


SOURCES: dict[str, Callable[[Path, Settings], Records]] = {
    ".txt": _txt_records,
    ".csv": _csv_records,
    ".jsonl": _jsonl_records,
    ".parquet": _parquet_records,
}
