"""The trajectory format: the one implementation of tags, parsing, validation,
statistics, rendering, block layout, token layout and request splitting in the project."""

from threadweaver_verl.format import validation
from threadweaver_verl.format.layout import BlockLayout
from threadweaver_verl.format.requests import Request, RequestKind, split_requests
from threadweaver_verl.format.stats import TrajectoryStats, compute_stats
from threadweaver_verl.format.tags import ALL_TAGS, TAG_STRINGS, Tag, TagTokenError, TagVocab, TokenizerError
from threadweaver_verl.format.tokens import NonCanonicalTrajectory, TokenFormat, eos_token_ids
from threadweaver_verl.format.tree import (
    Block,
    Marker,
    Outline,
    Outlines,
    Span,
    Stray,
    Thread,
    Trajectory,
    iter_atoms,
    node_length,
    parse_ids,
    parse_text,
    render_ids,
    render_text,
)
from threadweaver_verl.format.validation import (
    FormatError,
    Limits,
    Rule,
    is_valid,
    leading_number,
    outline_numbers,
    split_number,
    validate,
)

__all__ = [
    "ALL_TAGS",
    "TAG_STRINGS",
    "Tag",
    "TagTokenError",
    "TokenizerError",
    "TagVocab",
    "Block",
    "Marker",
    "Outline",
    "Outlines",
    "Span",
    "Stray",
    "Thread",
    "Trajectory",
    "iter_atoms",
    "node_length",
    "parse_ids",
    "parse_text",
    "render_ids",
    "render_text",
    "BlockLayout",
    "validation",
    "FormatError",
    "Limits",
    "Rule",
    "split_number",
    "is_valid",
    "leading_number",
    "outline_numbers",
    "validate",
    "TrajectoryStats",
    "compute_stats",
    "NonCanonicalTrajectory",
    "TokenFormat",
    "eos_token_ids",
    "Request",
    "RequestKind",
    "split_requests",
]
