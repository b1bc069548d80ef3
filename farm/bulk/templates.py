"""Prompt templates of a bulk manifest, expanded with dynamicprompts (``{red|green}``, ``__wildcard__``).

``combinatorial``: every combination in dynamicprompts' order, at most ``max_combinations``; ``random``:
``variants`` picks seeded from (base seed, row), so a manifest always expands the same way; ``none``: the
template as it is. A template's problem is a ``RowProblem`` for its row. Its length is capped by the
caller before it gets here (``farm.bulk.manifest``): parsing a long template costs seconds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator
from dynamicprompts.wildcards import WildcardManager
from dynamicprompts.wildcards.values import WildcardValues

from farm.bulk.records import RowProblem

Expand = Literal["none", "combinatorial", "random"]

# characters with a meaning in dynamicprompts' grammar (a tab is expanded to spaces by its parser)
_TEMPLATE_CHARS = frozenset("{}$%#\t")


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


class Expander:
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
