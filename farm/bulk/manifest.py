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
``Sample.extra`` metadata. A CSV cell of a non-text field is parsed as JSON (``4``, ``1.5``,
``true``, ``{"width": 512, "height": 512}``), else kept as text (a named size like
``square``); an empty cell, or a JSON/Parquet null, means "not given".

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

Every sample is validated as a ``GenerateInput`` (``num_images=1``). A bad row (bad JSON, empty
prompt, invalid field, bad seed, template syntax error) yields no sample and consumes no index:
its ``RowError`` ("row 7: image_size.width: must be a multiple of 8") goes to ``on_error``, or
with ``strict=True`` raises ``ManifestError``.
"""

from __future__ import annotations

import hashlib
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

from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator
from dynamicprompts.wildcards import WildcardManager
from dynamicprompts.wildcards.values import WildcardValues

from farm.admission import admit
from farm.bulk.records import PARQUET_BATCH_ROWS, SOURCES, SUFFIXES, ManifestError, Records, RowProblem
from farm.config import get_settings
from farm.errors import InvalidInputError
from farm.schemas import GenerateInput

__all__ = ["PARQUET_BATCH_ROWS", "SUFFIXES", "ManifestError", "RowError", "Sample", "read_manifest"]

logger = logging.getLogger(__name__)

Expand = Literal["none", "combinatorial", "random"]

FORBIDDEN = ("num_images", "sync_mode", "request_id")  # set by the bulk job, never per row

_PER_SAMPLE = frozenset({"prompt", "negative_prompt", "seed"})
_NOT_PARAMS = {"prompt", "negative_prompt", "seed", "num_images", "request_id", "sync_mode"}
_FIELDS = frozenset(GenerateInput.model_fields)
# characters with a meaning in dynamicprompts' grammar (a tab is expanded to spaces by its parser)
_TEMPLATE_CHARS = frozenset("{}$%#\t")


def _is_text(annotation: Any) -> bool:
    if annotation is str:
        return True
    return get_origin(annotation) is Literal and all(isinstance(a, str) for a in get_args(annotation))


# fields whose CSV cell is taken as text; any other field's cell is parsed as JSON first
_TEXT_FIELDS = frozenset(name for name, f in GenerateInput.model_fields.items() if _is_text(f.annotation))


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


class _UnknownWildcardError(Exception):
    pass


class _StrictWildcards(WildcardManager):
    """A WildcardManager that fails on an unknown wildcard instead of repeating it verbatim."""

    def get_values(self, wildcard: str) -> WildcardValues:
        values = super().get_values(wildcard)
        if not len(values):
            raise _UnknownWildcardError(self.to_wildcard(wildcard))
        return values


def _derived_seed(base_seed: int, row: int, k: int) -> int:
    digest = hashlib.blake2b(f"{base_seed}:{row}:{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class _Expander:
    """Template expansion of one manifest read."""

    def __init__(self, mode: Expand, variants: int, max_combinations: int, base_seed: int,
                 wildcards: Path | None) -> None:
        self.mode = mode
        self.variants = variants
        self.max_combinations = max_combinations
        self.base_seed = base_seed
        manager = _StrictWildcards(wildcards)
        self._combinatorial = CombinatorialPromptGenerator(wildcard_manager=manager)
        self._random = RandomPromptGenerator(wildcard_manager=manager)

    def __call__(self, template: str, row: int) -> list[str]:
        if self.mode == "none":
            return [template]
        # no template syntax: dynamicprompts would return the text unchanged, so skip its parser
        literal = "__" not in template and not _TEMPLATE_CHARS.intersection(template)
        try:
            if self.mode == "combinatorial":
                if literal:
                    return [template]
                prompts = self._combinatorial.generate(template, max_prompts=self.max_combinations)
            else:
                if literal:
                    return [template] * self.variants
                seeds = [_derived_seed(self.base_seed, row, k) for k in range(self.variants)]
                prompts = self._random.generate(template, self.variants, seeds=seeds)
        except _UnknownWildcardError as exc:
            raise RowProblem(f"prompt: unknown wildcard {exc}") from None
        except Exception as exc:
            raise RowProblem(f"prompt: invalid template: {exc}") from None
        if not prompts:
            raise RowProblem("prompt: the template expands to no prompt")
        return prompts


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

    def __init__(self, defaults: dict[str, Any], images_per_prompt: int, base_seed: int, expander: _Expander) -> None:
        self.defaults = defaults
        self.images_per_prompt = images_per_prompt
        self.base_seed = base_seed
        self.expander = expander
        self.settings = get_settings()  # the bounds a sample is admitted with (farm.admission)

    def samples(self, row: int, record: dict[str, Any], text: bool, index: int) -> list[Sample]:
        template = record.get("prompt")
        if template is None:
            raise RowProblem("prompt: missing")
        if not isinstance(template, str):
            raise RowProblem(f"prompt: must be a string (got {type(template).__name__})")
        if not template.strip():
            raise RowProblem("prompt: must not be empty")
        negative = record.get("negative_prompt")
        if negative is None or (text and negative == ""):
            negative = self.defaults.get("negative_prompt")
        elif not isinstance(negative, str):
            raise RowProblem(f"negative_prompt: must be a string (got {type(negative).__name__})")
        seed = _row_seed(record.get("seed"), text)

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

        out: list[Sample] = []
        params: dict[str, Any] | None = None
        for prompt in self.expander(template, row):
            for _ in range(self.images_per_prompt):
                j = len(out)
                sample_seed = seed + j if seed is not None else self.base_seed + index + j
                data = {**self.defaults, **overrides, "prompt": prompt, "num_images": 1, "seed": sample_seed}
                if negative is not None:
                    data["negative_prompt"] = negative
                try:
                    model = admit(data, None, self.settings)
                except InvalidInputError as exc:
                    raise RowProblem("; ".join(f"{f}: {r}" for f, r in exc.errors)) from None  # type: ignore[attr-defined]
                if params is None:
                    params = model.model_dump(mode="json", exclude=_NOT_PARAMS)
                out.append(Sample(
                    index=index + j, row=row, prompt=prompt, template=template, negative_prompt=negative,
                    seed=sample_seed, params=dict(params), extra=dict(extra),
                ))
        return out


def _check_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    for name in ("prompt", "seed", *FORBIDDEN):
        if name in defaults:
            why = "comes from the manifest" if name == "prompt" else "is set per sample by the bulk job"
            raise InvalidInputError(name, f"{why}; not allowed in the job defaults")
    admit({**defaults, "prompt": "defaults"}, None, get_settings())  # raises InvalidInputError naming the field
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
) -> Iterator[Sample]:
    """Stream the samples of the manifest at ``path`` (see the module docstring for the rules).

    Arguments, defaults and the format are checked now; the file is read as the iterator is
    consumed. Raises ManifestError (unreadable file, unknown format, no ``prompt`` column, and
    with ``strict`` the first bad row) and InvalidInputError (a bad default or argument).
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
    reader = _Reader(
        _check_defaults(defaults or {}), images_per_prompt, base_seed,
        _Expander(expand, variants, max_combinations, base_seed, Path(wildcards) if wildcards else None),
    )
    return _samples(SOURCES[suffix](path), reader, strict, on_error)


def _samples(records: Records, reader: _Reader, strict: bool,
             on_error: Callable[[RowError], None] | None) -> Iterator[Sample]:
    index = 0
    with closing(records):
        for row, record, text in records:
            try:
                if isinstance(record, RowProblem):
                    raise record
                samples = reader.samples(row, record, text, index)
            except RowProblem as problem:
                error = RowError(row, f"row {row}: {problem}")
                if strict:
                    raise ManifestError(error.message, row) from None
                if on_error is not None:
                    on_error(error)
                else:
                    logger.warning("manifest %s skipped", error.message)
                continue
            index += len(samples)
            yield from samples
