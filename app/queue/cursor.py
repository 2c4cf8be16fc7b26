"""Opaque paging cursors: a keyset position (timestamp, id) tagged with the list it belongs to."""

import base64
import binascii
import json
from datetime import UTC, datetime

from app.queue.errors import InvalidCursor


def encode_cursor(kind: str, at: datetime, job_id: str) -> str:
    raw = json.dumps([kind, at.astimezone(UTC).isoformat(), job_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str) -> tuple[datetime, str]:
    """The position inside a cursor this server issued for the list `kind`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        tag, at, job_id = json.loads(raw)
        moment = datetime.fromisoformat(at)
        if tag != kind or not isinstance(job_id, str) or "\x00" in job_id or not moment.tzinfo:
            raise ValueError(cursor)
    except (ValueError, TypeError, RecursionError, binascii.Error) as exc:
        raise InvalidCursor(
            f"cursor {cursor[:100]!r} was not issued by this server for this list; "
            "pass the next_cursor value of a previous page unchanged"
        ) from exc
    return moment, job_id
