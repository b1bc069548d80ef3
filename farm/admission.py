"""Admission: one step takes a request from raw fields to an accepted input, for every face
(HTTP, realtime, CLI, Celery ``farm.generate``, bulk).

:func:`admit` checks, cheapest first:

1. the fields and their bounds (``farm.schemas`` validated with the settings given): types, list
   lengths (``max_loras``, ``max_embeddings``), sizes, steps, prompt length; no per-item I/O yet;
2. each LoRA / embedding reference (``farm.inputs.refs``): a file under the files root (a stat), a
   hub id, a data URI (decoded, size-capped), an upload URL or an ``https://`` URL (vetted, no DNS);
3. upload URLs only of the request's owner (when the face knows the owner);
4. image-to-image / inpainting source images (``farm.inputs.images``): a URL, data URI or upload URL,
   and, where the bytes are here already (data URIs), their format, header size and mask size.

It touches the file system: a face on an event loop calls it in a thread. What a face adds (an API
key's image limit, the realtime frame cap, idempotency, quotas) stays with the face.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from farm.config import Settings, get_settings
from farm.errors import InvalidInputError
from farm.image_schemas import INPUT_CLASSES, task_of_fields, weight_refs
from farm.inputs.images import check_images
from farm.inputs.refs import check_owner, resolve_weights_path
from farm.schemas import FieldError, GenerateInput, field_errors


def refused(errors: list[FieldError]) -> InvalidInputError:
    """InvalidInputError naming the first bad field; ``errors`` holds every (field, reason) pair."""
    field, reason = errors[0]
    err = InvalidInputError(field, reason)
    err.errors = errors  # type: ignore[attr-defined]
    return err


def admit(fields: Mapping[str, Any] | GenerateInput, owner: str | None, settings: Settings,
          task: str | None = None) -> GenerateInput:
    """The accepted input of a request; InvalidInputError naming the first bad field (``.errors``: all).

    ``fields``: the raw fields, or an input a framework parsed without bounds (FastAPI's body): its
    fields as given are admitted again, as the same task. ``owner`` None: no upload-owner check (the face
    has no owner yet, or checks it itself). ``task`` (``farm.image_schemas``): the endpoint's; None: the
    one the fields name (``image_url``: image-to-image, ``mask_url``: inpainting)."""
    if isinstance(fields, GenerateInput):
        cls: type[GenerateInput] = type(fields)
        data: Mapping[str, Any] = fields.model_dump(mode="json", exclude_unset=True)
    else:
        cls, data = INPUT_CLASSES[task or task_of_fields(fields)], fields
    try:
        inp = cls.model_validate(data, context={"settings": settings})
    except ValidationError as exc:
        raise refused(field_errors(exc)) from None
    errors: list[FieldError] = []
    for field, path in weight_refs(inp):
        try:
            resolve_weights_path(path, settings)
        except ValueError as exc:
            errors.append((field, str(exc)))
    if errors:
        raise refused(errors)
    if owner is not None:
        check_owner(inp, owner)
    check_images(inp, owner, settings)
    return inp


def parse_input(data: Mapping[str, Any], settings: Settings | None = None) -> GenerateInput:
    """:func:`admit` without an owner, with this process's settings unless given."""
    return admit(data, None, settings or get_settings())
