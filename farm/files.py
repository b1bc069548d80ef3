"""User-given weight paths (LoRAs, embeddings): an allowed local root, a hub id, or a
remote input (``https://`` URL, our own upload URL, base64 ``data:`` URI; see ``farm.inputs``).

No path from user input may point outside ``files_root``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from farm.config import Settings

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
NOT_ALLOWED = "not a file under the allowed files root (FARM_FILES_ROOT), nor a hub id like 'owner/name'"


@dataclass(frozen=True)
class WeightsRef:
    kind: Literal["local", "hub", "data", "upload", "url", "stored"]
    value: str  # absolute path for local, repo id for hub, the URL / data URI itself otherwise


def resolve_weights_path(path: str, settings: Settings) -> WeightsRef:
    """Map a user's ``path`` to a local file under the allowed root, or a hub id.

    Raises ValueError with the reason when the path is not acceptable.
    """
    if not path or not path.strip():
        raise ValueError("must not be empty")
    if "\x00" in path:
        raise ValueError("must not contain NUL bytes")
    from farm.inputs import check_input

    remote = check_input(path, settings)  # no network access; the worker fetches
    if remote is not None:
        return WeightsRef(remote, path)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", path) and not Path(path).is_absolute():
        raise ValueError("only https:// URLs, base64 data: URIs, paths under the files root or hub ids are accepted")
    if ".." in PurePosixPath(path).parts:
        raise ValueError("must not contain '..'")
    root = settings.effective_files_root
    candidate = Path(path)
    candidate = candidate if candidate.is_absolute() else root / candidate
    resolved = candidate.resolve()
    inside = resolved == root or root in resolved.parents
    if inside and resolved.is_file():
        return WeightsRef("local", str(resolved))
    if not Path(path).is_absolute() and HUB_ID.match(path):
        return WeightsRef("hub", path)
    # one answer for a path that is missing and one that exists outside the root (no file-existence
    # oracle), and no server path in it
    raise ValueError(NOT_ALLOWED)
