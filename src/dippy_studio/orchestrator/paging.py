"""Cursor paging for the list routes (`GET /v1/requests`, `GET /v1/loras`).

Lists are newest first, ordered by (created_at, id), both descending. A cursor is the last item's
(created_at, id), base64url-encoded JSON: opaque to clients, and stable under inserts, since a new
item sorts before every page already handed out, so a client walking forward never sees a repeat
or skips an item. No database state is kept per cursor.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from dippy_studio.orchestrator.schemas import ID_PATTERN

# A cursor this long is not one of ours (they are about 80 characters).
MAX_CURSOR_CHARS = 256


class BadCursor(ValueError):
    """A cursor this API did not hand out (or one that was altered)."""


@dataclass(frozen=True)
class Position:
    """Where a page ended: items strictly older than this come next."""

    created_at: datetime
    id: str


def encode_cursor(created_at: datetime, item_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), item_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    """The position a cursor names; `BadCursor` (with the reason) for anything else."""
    if len(cursor) > MAX_CURSOR_CHARS:
        raise BadCursor(f"cursor is over {MAX_CURSOR_CHARS} characters: pass back an X-Next-Cursor as given")
    not_ours = BadCursor("cursor is not one this API handed out: pass back an X-Next-Cursor as given")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, item_id = json.loads(raw)
        created_at = datetime.fromisoformat(created)
        # In UTC, as the database compares it: a time with an offset that carries it past
        # year 1 or 9999 is no time any item was created at.
        position = Position(created_at.astimezone(UTC), item_id) if created_at.tzinfo is not None else None
    except (binascii.Error, ValueError, TypeError, OverflowError):
        raise not_ours from None
    # Only ids we hand out: anything else (a NUL, which PostgreSQL refuses) never reaches a query.
    if position is None or not isinstance(item_id, str) or not re.fullmatch(ID_PATTERN, item_id):
        raise not_ours
    return position


def next_link(url: str, cursor: str) -> str:
    """The `Link` header value for the next page: this request's URL with `cursor` replaced."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "cursor"]
    query.append(("cursor", cursor))
    return f'<{urlunsplit(parts._replace(query=urlencode(query)))}>; rel="next"'
