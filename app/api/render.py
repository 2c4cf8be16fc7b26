"""Response bodies built straight from the domain objects and serialized once (orjson).

On the hot path FastAPI's response_model would validate each answer again through
pydantic, which costs more than the database work behind it. Routes still declare their
response models, so the OpenAPI spec is unchanged; a test compares both renderings.
"""

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from fastapi import Response

from app.api.schemas import format_timestamp
from app.queue.errors import Conflict, QueueError
from app.queue.models import AnyJob, FailedJob, FailOutcome, Job, Lease, Retrying, SucceededJob


def job(found: AnyJob) -> dict[str, Any]:
    """A job in the shape of JobOut, SucceededJobOut or FailedJobOut."""
    out: dict[str, Any] = {
        "id": found.id,
        "name": found.name,
        "payload": found.payload,
        "attempts": found.attempts,
    }
    if isinstance(found, Job):
        reserved_at = found.reserved_at
        out["max_retries"] = found.max_retries
        out["created_at"] = format_timestamp(found.created_at)
        out["available_at"] = format_timestamp(found.available_at)
        out["reserved_at"] = None if reserved_at is None else format_timestamp(reserved_at)
        out["reserved_by"] = found.reserved_by
        expires = found.lease_expires_at
        out["lease_expires_at"] = None if expires is None else format_timestamp(expires)
    elif isinstance(found, SucceededJob):
        out["created_at"] = format_timestamp(found.created_at)
        out["available_at"] = format_timestamp(found.available_at)
        out["succeeded_at"] = format_timestamp(found.succeeded_at)
    else:
        assert isinstance(found, FailedJob)
        out["exception"] = found.exception
        out["created_at"] = format_timestamp(found.created_at)
        out["available_at"] = format_timestamp(found.available_at)
        out["failed_at"] = format_timestamp(found.failed_at)
    out["priority"] = found.priority
    out["schedule_id"] = found.schedule_id
    scheduled_for = found.scheduled_for
    out["scheduled_for"] = None if scheduled_for is None else format_timestamp(scheduled_for)
    out["catch_up"] = found.catch_up
    out["state"] = found.state
    return out


def lease(granted: Lease) -> dict[str, Any]:
    return {
        "id": granted.id,
        "expires_at": format_timestamp(granted.expires_at),
        "job": job(granted.job),
    }


def fail_outcome(outcome: FailOutcome) -> dict[str, Any]:
    kind = "retrying" if isinstance(outcome, Retrying) else "failed"
    return {"outcome": kind, "job": job(outcome.job)}


def refusal(error: QueueError, status: int) -> dict[str, Any]:
    """The body of a refused change: `detail`, `code` and, when this very lease finished
    the job, the job."""
    out: dict[str, Any] = {"detail": error.detail, "code": getattr(error, "code", "conflict")}
    if isinstance(error, Conflict) and error.job is not None:
        out["job"] = job(error.job)  # type: ignore[arg-type]
    return out


def item(lease_id: str, result: object, status_of: Any, ok: Any) -> dict[str, Any]:
    """One result of a batch call: `ok(result)` under status 200, or the refusal."""
    if isinstance(result, QueueError):
        status = status_of(result)
        return {"id": lease_id, "status": status, **refusal(result, status)}
    return {"id": lease_id, "status": 200, **ok(result)}


def expiry(expires_at: datetime) -> dict[str, Any]:
    return {"expires_at": format_timestamp(expires_at)}


def json(body: Mapping[str, Any] | list[Any], status: int = 200, **headers: str) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )
