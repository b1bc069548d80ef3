"""Prompt expansion (``expand_prompt: true``). Import-light: no torch.

The rule, exactly:

1. Strip surrounding whitespace and any trailing commas from the prompt.
2. For each phrase of :data:`QUALITY_PHRASES`, in order, append ``", " + phrase`` unless the
   phrase already occurs in the prompt, compared case-insensitively with runs of whitespace
   collapsed to one space.

So ``"a cat"`` becomes ``"a cat, highly detailed, sharp focus, high quality, professional
lighting"``; a prompt that already says ``"Sharp  Focus"`` does not get that phrase twice. The
expansion is deterministic and idempotent (expanding an expanded prompt changes nothing), and
the expanded text is what the result reports as its ``prompt``. Like any long prompt, text past
CLIP's 77 tokens is cut off by the tokenizer, so a long prompt may lose some appended phrases.
"""

from __future__ import annotations

import re

QUALITY_PHRASES: tuple[str, ...] = (
    "highly detailed",
    "sharp focus",
    "high quality",
    "professional lighting",
)

_SPACES = re.compile(r"\s+")


def _normal(text: str) -> str:
    return _SPACES.sub(" ", text).lower()


def expand_prompt(prompt: str) -> str:
    """Return ``prompt`` with the missing :data:`QUALITY_PHRASES` appended (see the module doc)."""
    base = prompt.strip().rstrip(",").rstrip()
    present = _normal(base)
    missing = [p for p in QUALITY_PHRASES if p not in present]
    if not missing:
        return base
    return ", ".join([base, *missing]) if base else ", ".join(missing)
