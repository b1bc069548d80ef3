"""Manifest record sources, one per format: ``(row, record or problem, cells are CSV text)``.

Each reads its file a line or a Parquet record batch at a time, never whole; ``row`` is the
1-based line number (CSV: the physical line a record starts on; Parquet: row number + 1).
A record a source cannot parse comes as a ``RowProblem`` for that row; a file it cannot read
at all raises ``ManifestError``.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from farm.bulk import arrow
from farm.errors import InvalidInputError

SUFFIXES = (".txt", ".csv", ".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 1024
_ROW_PREFIX = re.compile(r"^row (\d+): ")


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


def _open_error(path: Path, exc: OSError) -> ManifestError:
    return ManifestError(f"{path.name}: cannot read the manifest: {exc.strerror or exc}")


def _lines(path: Path) -> Generator[tuple[int, str | RowProblem], None, None]:
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise _open_error(path, exc) from None
    with fh:
        for row, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield row, RowProblem("input: not valid UTF-8")
                continue
            yield row, (line.removeprefix("\ufeff") if row == 1 else line).strip()


def _txt_records(path: Path) -> Records:
    for row, line in _lines(path):
        if isinstance(line, RowProblem):
            yield row, line, False
        elif line and not line.startswith("#"):
            yield row, {"prompt": line}, False


def _jsonl_records(path: Path) -> Records:
    for row, line in _lines(path):
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
        if isinstance(obj, dict):
            yield row, obj, False
        else:
            yield row, RowProblem(f"input: expected a JSON object, got {type(obj).__name__}"), False


def _csv_records(path: Path) -> Records:
    try:
        fh = path.open("r", encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise _open_error(path, exc) from None
    with fh:
        reader = csv.reader(fh)
        header: list[str] | None = None
        consumed = 0  # physical lines read so far
        try:
            for cells in reader:
                start, consumed = consumed + 1, reader.line_num
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
                yield start, {k: v for k, v in zip(header, cells, strict=False) if k}, True
        except csv.Error as exc:
            raise ManifestError(f"row {consumed + 1}: input: {exc}", consumed + 1) from None
        except UnicodeDecodeError:
            raise ManifestError(f"row {consumed + 1}: input: not valid UTF-8", consumed + 1) from None
    if header is None:
        raise ManifestError(f"{path.name}: empty CSV; expected a header row with a 'prompt' column")


def _parquet_records(path: Path) -> Records:
    pa, pq = arrow.pyarrow(), arrow.parquet()

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise ManifestError(f"{path.name}: cannot read as Parquet: {exc}") from None
    try:
        if "prompt" not in pf.schema_arrow.names:
            raise ManifestError(f"{path.name}: the Parquet file has no 'prompt' column")
        row = 0
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                row += 1
                yield row, record, False
    finally:
        pf.close()


SOURCES: dict[str, Callable[[Path], Records]] = {
    ".txt": _txt_records,
    ".csv": _csv_records,
    ".jsonl": _jsonl_records,
    ".parquet": _parquet_records,
}
