"""Bulk actions on jobs for operators and dashboards: retry or delete by ids or by filter.

Every call is logged with a fingerprint of the caller's token (never the token)."""

import hashlib
import logging
from typing import Any

from fastapi import APIRouter, Request, Response

from app.api import render
from app.api.auth import require
from app.api.deps import Service
from app.api.errors import responses, status_of
from app.api.schemas import (
    BulkFilterOut,
    DeleteJobsRequest,
    DeleteResultsOut,
    RetryJobsRequest,
    RetryResultsOut,
)
from app.queue.bulk import BulkOutcome
from app.queue.models import Job

router = APIRouter(prefix="/jobs", tags=["jobs"])
log = logging.getLogger("bgjobs.bulk")


def fingerprint(request: Request) -> str:
    """Who acted, for the log: the first 12 hex digits of the token's SHA-256."""
    _, _, token = (request.headers.get("authorization") or "").partition(" ")
    if not token.strip():
        return "no token"
    return "token sha256:" + hashlib.sha256(token.strip().encode()).hexdigest()[:12]


def _filter_answer(request: Request, action: str, what: str, outcome: BulkOutcome) -> Response:
    log.info(
        "bulk %s of %s by %s: %d done, %d skipped%s",
        action, what, fingerprint(request), outcome.done, outcome.skipped,
        ", more to do" if outcome.more else "",
    )  # fmt: skip
    return render.json({"done": outcome.done, "skipped": outcome.skipped, "more": outcome.more})


def _retried(job: Job) -> dict[str, Any]:
    return {"job": render.job(job)}


@router.post(
    "/retry",
    operation_id="retry_jobs",
    summary="Retry failed jobs in bulk",
    dependencies=[require("admin")],
    response_model=RetryResultsOut | BulkFilterOut,
    response_description="With `ids`: one result per id, in order (the job, available again, "
    "or why not: 404 `not_found`, 409 `not_failed`). With `filter`: how many were retried.",
    responses=responses(),
)
async def retry_jobs(body: RetryJobsRequest, request: Request, service: Service) -> Response:
    """Put failed jobs back in the queue, attempts reset, by `ids` or by `filter`. A filter
    call works on the jobs that had failed when it started, at most 10,000 of them; a job
    it retried that fails again is not retried twice. Repeat while `more`."""
    if body.filter is not None:
        what = f"failed jobs{_named(body.filter.name)}"
        outcome = await service.bulk.by_filter("retry", "failed", body.filter.name)
        return _filter_answer(request, "retry", what, outcome)
    assert body.ids is not None
    results = await service.bulk.retry_ids(body.ids)
    log.info("bulk retry of %d id(s) by %s", len(body.ids), fingerprint(request))
    items = [render.item(i, r, status_of, _retried) for i, r in zip(body.ids, results, strict=True)]
    return render.json({"results": items})


@router.post(
    "/delete",
    operation_id="delete_jobs",
    summary="Delete jobs in bulk",
    dependencies=[require("admin")],
    response_model=DeleteResultsOut | BulkFilterOut,
    response_description="With `ids`: one result per id, in order (200 deleted, or 404 "
    "`not_found`, 409 `reserved`). With `filter`: how many were deleted.",
    responses=responses(),
)
async def delete_jobs(body: DeleteJobsRequest, request: Request, service: Service) -> Response:
    """Delete pending or finished jobs by `ids`, or every job of a state by `filter`
    (`reserved` is refused). A job leased meanwhile is skipped, never deleted. A filter call
    works on the jobs in that state when it started, at most 10,000; repeat while `more`."""
    if body.filter is not None:
        state, name = body.filter.state, body.filter.name
        outcome = await service.bulk.by_filter("delete", state, name)
        return _filter_answer(request, "delete", f"{state} jobs{_named(name)}", outcome)
    assert body.ids is not None
    results = await service.bulk.delete_ids(body.ids)
    log.info("bulk delete of %d id(s) by %s", len(body.ids), fingerprint(request))
    items = [
        render.item(i, r, status_of, lambda _: {}) for i, r in zip(body.ids, results, strict=True)
    ]
    return render.json({"results": items})


def _named(name: str | None) -> str:
    return f" named {name!r}" if name is not None else ""
