"""pyarrow, which only bulk jobs need: imported on first use, with the extra to install when it is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from farm.errors import FarmError


class BulkExtraMissingError(FarmError):
    """Raised when a bulk job needs pyarrow and this install lacks it (the base install leaves it out)."""

    http_status = 500
    error_type = "bulk_extra_missing"


def _load(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise BulkExtraMissingError(f"bulk jobs need pyarrow, which this install lacks ({exc}): "
                                    "pip install 'lcm-farm[bulk]'") from None


def pyarrow() -> ModuleType:
    return _load("pyarrow")


def parquet() -> ModuleType:
    return _load("pyarrow.parquet")
