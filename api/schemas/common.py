"""Schemas every resource shares: the error body, paging, the probes, path-text validation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from apiflask import Schema
from apiflask.fields import DateTime
from apiflask.fields import Dict
from apiflask.fields import Float
from apiflask.fields import Integer
from apiflask.fields import List
from apiflask.fields import Nested
from apiflask.fields import String
from marshmallow import ValidationError

#: Integer columns are 32-bit: a bigger number is refused as input, not overflowed in SQL.
MAX_INT32 = 2**31 - 1
MAX_PATH_CHARS = 4096
#: Keeps ``OFFSET`` inside a 64-bit integer whatever page a client asks for.
MAX_PAGE = 2**31 - 1


def validate_path_text(value: str) -> None:
    """A path-like string a filesystem and a database can hold: no NUL, no lone surrogates
    (JSON's ``"\\ud800"`` decodes to one, and neither UTF-8 nor the OS can encode it)."""
    if "\x00" in value:
        raise ValidationError("must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError("must be valid Unicode text (no lone surrogates)") from exc
    if len(value) > MAX_PATH_CHARS:
        raise ValidationError(f"must be at most {MAX_PATH_CHARS} characters")


# -- errors ---------------------------------------------------------------------------------


class ErrorDetail(Schema):
    code = String(required=True, metadata={"description": "Stable machine-readable code."})
    message = String(required=True, metadata={"description": "Human-readable explanation."})


class ErrorOut(Schema):
    error = Nested(ErrorDetail, required=True)


# -- paging ---------------------------------------------------------------------------------


class PageQuery(Schema):
    page = Integer(load_default=1, metadata={"description": "1-based; clamped to >= 1."})
    limit = Integer(load_default=20, metadata={"description": "Clamped to 1..max page size."})


class PageOut(Schema):
    """The paging fields of every list answer; each list adds its ``items``."""

    page = Integer(required=True)
    limit = Integer(required=True)
    total = Integer(required=True)


class LifecycleOut(Schema):
    """When a job or a training run was created, started and finished."""

    created_at = DateTime(required=True)
    started_at = DateTime(allow_none=True)
    finished_at = DateTime(allow_none=True)
    duration_seconds = Float(allow_none=True)


def clamp_page(query: Mapping[str, Any], max_page_size: int) -> tuple[int, int]:
    """``(page, limit)`` of a :class:`PageQuery`, clamped rather than refused: a client asking
    for 10^6 rows gets the largest page, one asking for page 0 the first."""
    limit = min(max(int(query.get("limit", 20)), 1), max_page_size)
    page = min(max(int(query.get("page", 1)), 1), MAX_PAGE)
    return page, limit


# -- health ---------------------------------------------------------------------------------


class HealthOut(Schema):
    status = String(required=True)


class ReadyOut(Schema):
    status = String(required=True, metadata={"enum": ["ready", "unavailable"]})
    checks = Dict(
        keys=String(),
        values=String(),
        required=True,
        metadata={"description": "database, broker, registry: 'ok' or why not."},
    )
    warnings = List(
        String(),
        metadata={
            "description": "Why work would wait although the API is ready: no inference worker "
            "or no trainer consuming its queue (informational, not a failed check)."
        },
    )
