"""Streaming manifest reader: prompt templates in, one ``Sample`` per image out.

Formats, by suffix:

* ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped;
* ``.csv``: a header row with a ``prompt`` column;
* ``.jsonl``: one JSON object per line, with ``prompt``;
* ``.parquet``: a ``prompt`` column, read a record batch (1,024 rows) at a time.

Files are read a line or a batch at a time, never whole, so memory stays flat however long
the manifest is. ``row`` is the 1-based line number (CSV: the physical line a record starts
on, the header being line 1; Parquet: row number + 1).

Optional columns: ``negative_prompt``, ``seed`` (an integer) and any ``GenerateInput`` field,
which overrides the job defaults for that row; ``num_images``, ``sync_mode`` and
``request_id`` are set by the bulk job and make a row bad. Other columns are kept as
``Sample.extra`` metadata. An ``image`` column (and ``mask``) makes the row image-to-image (inpainting):
a URL or a file under the bulk root (``farm.bulk.image_column``); ``strength``, ``crop_output`` and
``preserve_aspect_ratio`` are then fields too, and a job default of one applies to image rows only.
A CSV cell of a non-text field is parsed as JSON (``4``, ``1.5``, ``true``,
``{"width": 512, "height": 512}``), else kept as text (a named size like ``square``); an empty
cell, or a JSON/Parquet null, means "not given".

Prompts are dynamicprompts templates (``{red|green}``, ``__wildcard__`` read from the
``wildcards`` folder; an unknown wildcard is an error). ``expand="combinatorial"`` yields every
combination, in dynamicprompts' order, at most ``max_combinations`` per row;
``expand="random"`` yields ``variants`` random picks, seeded from (``base_seed``, row), so a
manifest always expands the same way; ``expand="none"`` uses the prompt literally. Each
expanded prompt yields ``images_per_prompt`` samples.

Seeds, the documented contract (a sample's metadata regenerates its image alone):

* a row with a ``seed`` S: its j-th sample (0-based, counting its expanded prompts in order,
  then the images of each) has seed ``S + j``;
* a row without one: a sample has seed ``base_seed + index``, ``index`` being its global
  sample number.

Caps, checked before the work they bound (issue 20): a template longer than
``FARM_BULK_MAX_TEMPLATE_CHARS`` is refused before it is parsed; a row expands to at most
``FARM_BULK_MAX_SAMPLES_PER_ROW`` samples (``variants`` × ``images_per_prompt`` over it is refused
when the job is created), and its samples are made one at a time as they are consumed, never as one
list; rows past ``FARM_BULK_MAX_MANIFEST_ROWS`` are not read (one row error says so); a NUL
character anywhere in a row (PostgreSQL stores none) makes the row bad.

Every sample is validated as a ``GenerateInput`` (``num_images=1``; once per expanded prompt, and
the row's last seed). A bad row (bad JSON, empty prompt, invalid field, bad seed, template syntax
error, a cap above) yields no sample and consumes no index:
its ``RowError`` ("row 7: image_size.width: must be a multiple of 8") goes to ``on_error``, or
with ``strict=True`` raises ``ManifestError``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from farm.admission import admit
from farm.bulk import image_column
from farm.bulk.records import (
    MAX_DEPTH,
    PARQUET_BATCH_ROWS,
    SOURCES,
    SUFFIXES,
    ManifestError,
    Records,
    RowProblem,
    depth,
)
from farm.bulk.templates import Expand, Expander
from farm.config import Settings, get_settings
from farm.errors import InvalidInputError
from farm.image_schemas import INPUT_CLASSES, TEXT_TO_IMAGE, task_of_fields

__all__ = ["PARQUET_BATCH_ROWS", "SUFFIXES", "ManifestError", "RowError", "Sample", "read_manifest"]

logger = logging.getLogger(__name__)

FORBIDDEN = ("num_images", "sync_mode", "request_id")  # set by the bulk job, never per row

_PER_SAMPLE = frozenset({"prompt", "negative_prompt", "seed"})
_NOT_PARAMS = {"prompt", "negative_prompt", "seed", "num_images", "request_id", "sync_mode"}
_MODEL_FIELDS = {name: f for cls in INPUT_CLASSES.values() for name, f in cls.model_fields.items()}
_FIELDS = frozenset(_MODEL_FIELDS) - set(image_column.COLUMNS)  # any task's fields; images come from take()


def _nul_field(record: dict[str, Any]) -> str | None:
    """The first field of a record holding a NUL character, in a key or any string within it."""
    stack: list[tuple[str, Any]] = [(str(k), v) for k, v in record.items()]
    while stack:
        name, value = stack.pop()
        if "\x00" in name or (isinstance(value, str) and "\x00" in value):
            return name.split(".")[0].replace("\x00", "\\0")
        if isinstance(value, dict):
            stack.extend((f"{name}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((name, v) for v in value)
    return None


def _is_text(annotation: Any) -> bool:
    if annotation is str:
        return True
    return get_origin(annotation) is Literal and all(isinstance(a, str) for a in get_args(annotation))


# fields whose CSV cell is taken as text; any other field's cell is parsed as JSON first
_TEXT_FIELDS = frozenset(name for name, f in _MODEL_FIELDS.items() if _is_text(f.annotation))


@dataclass(frozen=True)
class Sample:
    """One image to render, with everything needed to render it again alone."""

    index: int
    row: int
    prompt: str
    template: str
    negative_prompt: str | None
    seed: int
    params: dict[str, Any]
    extra: dict[str, Any]


@dataclass(frozen=True)
class RowError:
    """A manifest row that yields no sample, and why."""

    row: int
    message: str


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (Parquet cells may be dates, decimals, bytes …)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


# -- rows to samples ------------------------------------------------------------------------------


def _row_seed(value: Any, text: bool) -> int | None:
    if value is None or (text and not str(value).strip()):
        return None
    if text:
        try:
            return int(str(value).strip())
        except ValueError:
            raise RowProblem(f"seed: must be an integer (got {value!r})") from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise RowProblem(f"seed: must be an integer (got {value!r})")


def _cell(field: str, value: str) -> Any:
    if field in _TEXT_FIELDS:
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value  # e.g. a named size; validation decides


class _Reader:
    """The per-read settings that turn a record into samples."""

    def __init__(self, defaults: dict[str, Any], images_per_prompt: int, base_seed: int, expander: Expander,
                 settings: Settings, owner: str | None = None, image_root: Path | None = None) -> None:
        self.defaults = defaults
        self.images_per_prompt = images_per_prompt
        self.base_seed = base_seed
        self.expander = expander
        self.settings = settings  # the bounds a sample is admitted with (farm.admission), and the caps
        self.owner = owner  # upload URLs in a row must be this owner's (None: not checked here)
        self.image_root = (image_root or settings.effective_bulk_root).resolve()  # image-column files only here

    def samples(self, row: int, record: dict[str, Any], text: bool, index: int) -> tuple[int, Iterator[Sample]]:
        """How many samples the row yields, and an iterator that makes them one at a time."""
        if depth(record) > MAX_DEPTH:
            raise RowProblem(f"input: nested more than {MAX_DEPTH} levels deep")
        if (bad := _nul_field(record)) is not None:
            raise RowProblem(f"{bad}: must not contain NUL characters")
        template = record.get("prompt")
        if template is None:
            raise RowProblem("prompt: missing")
        if not isinstance(template, str):
            raise RowProblem(f"prompt: must be a string (got {type(template).__name__})")
        if not template.strip():
            raise RowProblem("prompt: must not be empty")
        cap = self.settings.bulk_max_template_chars
        if len(template) > cap:  # before dynamicprompts parses it: a long template costs seconds
            raise RowProblem(f"prompt: {len(template)} characters; at most {cap} (FARM_BULK_MAX_TEMPLATE_CHARS)")
        negative = record.get("negative_prompt")
        if negative is None or (text and negative == ""):
            negative = self.defaults.get("negative_prompt")
        elif not isinstance(negative, str):
            raise RowProblem(f"negative_prompt: must be a string (got {type(negative).__name__})")
        seed = _row_seed(record.get("seed"), text)
        record = dict(record)
        try:
            source = image_column.take(record, text, self.image_root, self.settings)  # popped out of the record
        except image_column.ColumnProblem as exc:
            raise RowProblem(str(exc)) from None
        refs = source.refs if source else {}
        # job-wide defaults of the row's task only (a job's strength is no text-to-image row's field)
        task = task_of_fields(refs)
        task_fields = INPUT_CLASSES[task].model_fields
        defaults = {k: v for k, v in self.defaults.items() if k in task_fields}

        overrides: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in record.items():
            if key in _PER_SAMPLE:
                continue
            if key not in _FIELDS:
                extra[str(key)] = _jsonable(value)
                continue
            if value is None or (text and value == ""):
                continue
            if key in FORBIDDEN:
                raise RowProblem(f"{key}: is set by the bulk job; remove it from the manifest")
            overrides[key] = _cell(key, value) if text else value

        if odd := sorted(set(overrides) - set(task_fields)):  # strength on a row without an image …
            raise RowProblem(f"{odd[0]}: not an input of {task} (an image column makes image-to-image)")
        prompts = self.expander(template, row)
        count = len(prompts) * self.images_per_prompt

        def seed_of(j: int) -> int:
            return seed + j if seed is not None else self.base_seed + index + j

        def admitted(prompt: str, sample_seed: int) -> dict[str, Any]:
            data = {**defaults, **overrides, **refs, "prompt": prompt, "num_images": 1, "seed": sample_seed}
            if negative is not None:
                data["negative_prompt"] = negative
            try:
                model = admit(data, self.owner, self.settings)
            except InvalidInputError as exc:
                named = source.columns if source else {}  # an error names the column the row gave
                errors = getattr(exc, "errors", [(exc.field, exc.reason)])  # all of them, or the one (images)
                raise RowProblem("; ".join(f"{named.get(f, f)}: {r}" for f, r in errors)) from None
            params = model.model_dump(mode="json", exclude=_NOT_PARAMS)
            if source:  # the ledger keeps the image as given (a path, not its bytes) and a local file's hash
                params.update(source.given)
                if source.sha256:
                    params[image_column.SHA256] = source.sha256
            return params

        # the row is admitted whole before its first sample: each prompt once (the images of a prompt
        # differ by their seed only) and the row's last seed (seeds only grow along a row)
        params = admitted(prompts[0], seed_of(0))
        for k, prompt in enumerate(prompts[1:], 1):
            admitted(prompt, seed_of(k * self.images_per_prompt))
        admitted(prompts[-1], seed_of(count - 1))

        def make() -> Iterator[Sample]:
            for k, prompt in enumerate(prompts):
                for i in range(self.images_per_prompt):
                    j = k * self.images_per_prompt + i
                    yield Sample(index=index + j, row=row, prompt=prompt, template=template,
                                 negative_prompt=negative, seed=seed_of(j), params=dict(params), extra=dict(extra))

        return count, make()


def _check_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    for name in ("prompt", "seed", *FORBIDDEN, *image_column.COLUMNS):
        if name in defaults:
            why = "is set per sample by the bulk job"
            if name == "prompt" or name in image_column.COLUMNS:
                why = "comes from the manifest"
            raise InvalidInputError(name, f"{why}; not allowed in the job defaults")
    check = {**defaults, "prompt": "defaults"}
    if set(defaults) - set(INPUT_CLASSES[TEXT_TO_IMAGE].model_fields):  # strength …: checked as image-to-image's
        check["image_url"] = "https://example.com/defaults.png"  # a stand-in, never fetched
    admit(check, None, get_settings())  # raises InvalidInputError naming the field
    return dict(defaults)


def read_manifest(
    path: Path,
    *,
    defaults: dict[str, Any] | None = None,
    images_per_prompt: int = 1,
    base_seed: int = 0,
    expand: Expand = "combinatorial",
    variants: int = 1,
    max_combinations: int = 1000,
    wildcards: Path | None = None,
    strict: bool = False,
    on_error: Callable[[RowError], None] | None = None,
    owner: str | None = None,
    image_root: Path | None = None,
) -> Iterator[Sample]:
    """Stream the samples of the manifest at ``path`` (see the module docstring for the rules).

    Arguments, defaults and the format are checked now; the file is read as the iterator is
    consumed. ``owner``: upload URLs must be this owner's; ``image_root``: where image-column paths resolve
    (default: the bulk root). Raises ManifestError (unreadable file, unknown
    format, no ``prompt`` column, and with ``strict`` the first bad row) and InvalidInputError (a bad
    default or argument).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SOURCES:
        raise ManifestError(
            f"{path.name}: unknown manifest format {suffix or '(no suffix)'!r}; supported: {', '.join(SUFFIXES)}"
        )
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file")
    if expand not in get_args(Expand):
        raise InvalidInputError("expand", f"must be one of {', '.join(get_args(Expand))} (got {expand!r})")
    for name, value in (("images_per_prompt", images_per_prompt), ("variants", variants),
                        ("max_combinations", max_combinations)):
        if value < 1:
            raise InvalidInputError(name, f"must be at least 1 (got {value})")
    if not 0 <= base_seed < 2**62:
        raise InvalidInputError("base_seed", f"must be between 0 and 2**62 - 1 (got {base_seed})")
    if wildcards is not None and not Path(wildcards).is_dir():
        raise InvalidInputError("wildcards", f"{wildcards} is not a folder")
    settings = get_settings()
    cap = settings.bulk_max_samples_per_row
    if images_per_prompt > cap:
        raise InvalidInputError("images_per_prompt", f"must be at most {cap} (FARM_BULK_MAX_SAMPLES_PER_ROW)")
    if expand == "random" and variants * images_per_prompt > cap:
        raise InvalidInputError("variants", f"variants × images_per_prompt is {variants * images_per_prompt}; "
                                f"at most {cap} (FARM_BULK_MAX_SAMPLES_PER_ROW)")
    # combinatorial: a row's combinations are cut at what the cap leaves room for
    max_combinations = min(max_combinations, cap // images_per_prompt)
    reader = _Reader(
        _check_defaults(defaults or {}), images_per_prompt, base_seed,
        Expander(expand, variants, max_combinations, base_seed, Path(wildcards) if wildcards else None), settings,
        owner, image_root or settings.effective_bulk_root,
    )
    return _samples(SOURCES[suffix](path, settings), reader, strict, on_error)


def _samples(records: Records, reader: _Reader, strict: bool,
             on_error: Callable[[RowError], None] | None) -> Iterator[Sample]:
    index = 0
    most = reader.settings.bulk_max_manifest_rows
    with closing(records):
        for row, record, text in records:
            if row > most:  # the rest is not read
                message = f"row {row}: the manifest has more than {most} rows (FARM_BULK_MAX_MANIFEST_ROWS)"
                if strict:
                    raise ManifestError(message, row)
                if on_error is not None:
                    on_error(RowError(row, message))
                return
            try:
                if isinstance(record, RowProblem):
                    raise record
                count, samples = reader.samples(row, record, text, index)
            except RowProblem as problem:
                error = RowError(row, f"row {row}: {problem}")
                if strict:
                    raise ManifestError(error.message, row) from None
                if on_error is not None:
                    on_error(error)
                else:
                    logger.warning("manifest %s skipped", error.message)
                continue
            index += count
            yield from samples
