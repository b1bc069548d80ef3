"""Encode rendered images to bytes: deterministic, no metadata.

The same pixels always give the same bytes: a fresh RGB image is built from the raw pixels
(so no ``info``, ICC profile, EXIF or text chunks ride along) and saved with fixed settings.
Pillow writes no timestamps in JPEG or PNG.
"""

from __future__ import annotations

import io
from typing import Literal

from PIL import Image

JPEG_QUALITY = 90
JPEG_SUBSAMPLING = 2  # 4:2:0
PNG_COMPRESS_LEVEL = 6

CONTENT_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png"}


def encode_image(image: Image.Image, fmt: Literal["jpeg", "png"]) -> tuple[bytes, str]:
    """Return ``(bytes, content_type)`` of ``image`` encoded as JPEG or PNG."""
    if fmt not in CONTENT_TYPES:
        raise ValueError(f"unsupported image format {fmt!r}; use 'jpeg' or 'png'")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    clean = Image.frombytes("RGB", rgb.size, rgb.tobytes())
    buf = io.BytesIO()
    if fmt == "jpeg":
        clean.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING, optimize=False)
    else:
        clean.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue(), CONTENT_TYPES[fmt]
