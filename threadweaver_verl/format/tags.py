"""The format's tags: the one list of them in the project.

Every tag must be exactly one token of the tokenizer; :class:`TagVocab` maps
each tag to its id and refuses a tokenizer where that does not hold.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from threadweaver_verl.runs import UserError


class Tag(str, enum.Enum):
    THINK_OPEN = "<think>"
    THINK_CLOSE = "</think>"
    PARALLEL_OPEN = "<Parallel>"
    PARALLEL_CLOSE = "</Parallel>"
    OUTLINES_OPEN = "<Outlines>"
    OUTLINES_CLOSE = "</Outlines>"
    OUTLINE_OPEN = "<Outline>"
    OUTLINE_CLOSE = "</Outline>"
    THREAD_OPEN = "<Thread>"
    THREAD_CLOSE = "</Thread>"

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.value


ALL_TAGS: tuple[Tag, ...] = tuple(Tag)
TAG_STRINGS: tuple[str, ...] = tuple(t.value for t in ALL_TAGS)
_BY_STRING = {t.value: t for t in ALL_TAGS}
# Longest first so that no tag is matched as a prefix of another.
TAG_PATTERN = re.compile("|".join(re.escape(s) for s in sorted(TAG_STRINGS, key=len, reverse=True)))


def tag_of_string(s: str) -> Tag:
    return _BY_STRING[s]


class TokenizerError(UserError, ValueError):
    """The tokenizer cannot carry the format (the message names the fix)."""


class TagTokenError(TokenizerError):
    """A tag is not exactly one token of the tokenizer."""


@dataclass(frozen=True)
class TagVocab:
    """Tag <-> token id, for one tokenizer."""

    ids: Mapping[Tag, int]

    def __post_init__(self) -> None:
        missing = [t.value for t in ALL_TAGS if t not in self.ids]
        if missing:
            raise TagTokenError(f"TagVocab lacks ids for {missing}")
        if len(set(self.ids.values())) != len(ALL_TAGS):
            raise TagTokenError(f"two tags share one token id: {dict((t.value, i) for t, i in self.ids.items())}")
        object.__setattr__(self, "_by_id", {i: t for t, i in self.ids.items()})

    def id(self, tag: Tag) -> int:
        return self.ids[tag]

    def tag(self, token_id: int) -> Tag | None:
        return self._by_id.get(token_id)  # type: ignore[attr-defined]

    @property
    def tags_by_id(self) -> Mapping[int, Tag]:
        """Token id -> tag, for the tag ids only."""
        return self._by_id  # type: ignore[attr-defined]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TagVocab:
        """Look every tag up in a HF tokenizer; raise naming the tag if it is not one token."""
        ids: dict[Tag, int] = {}
        for tag in ALL_TAGS:
            encoded = tokenizer.encode(tag.value, add_special_tokens=False)
            if len(encoded) != 1:
                raise TagTokenError(
                    f"tag {tag.value!r} is {len(encoded)} tokens {encoded} in this tokenizer, not one. "
                    "Add the tags first: `python -m threadweaver_verl prepare-model model=DIR out=DIR` "
                    "(threadweaver_verl.models.tags.add_tags)."
                )
            ids[tag] = encoded[0]
        return cls(ids)
