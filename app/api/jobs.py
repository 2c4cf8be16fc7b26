"""/jobs: enqueue, look up, list, cancel and retry jobs."""

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import StringConstraints, TypeAdapter, ValidationError

from app.api import render
from app.api.auth import authorize, require
from app.api.body import documented, parse
from app.api.deps import Service
from app.api.errors import responses
from app.api.schemas import (
    NO_NUL_PATTERN,
    AnyJobOut,
    EnqueueBatchRequest,
    EnqueueRequest,
    FailedJobPage,
    FailureGroupOut,
    FailureGroupsOut,
    JobOut,
    JobPage,
    JobsOut,
    NoNul,
    SucceededJobPage,
)
from app.queue.models import AnyJob, Job
from app.queue.service import GROUP_SCAN, JobSpec, QueueService

router = APIRouter(prefix="/jobs", tags=["jobs"])

Search = Annotated[
    Annotated[str, NoNul] | None,  # the rule checks text; an absent q is None
    Query(
        min_length=1,
        max_length=200,
        description="Only jobs whose payload (or exception) contains this text, case-sensitive. "
        "A bounded scan: each call reads at most 10,000 jobs, so a page may hold fewer "
        "matches than `limit` (even none) with a `next_cursor` to go on searching. "
        "Any text but NUL (\\u0000), which no job can hold.",
        json_schema_extra={"pattern": NO_NUL_PATTERN},
    ),
]
NameFilter = Annotated[
    str | None,
    Query(pattern=r"^[A-Za-z0-9_.:\-]{1,255}$", description="Only jobs of this name."),
]
Limit = Annotated[int, Query(ge=1, le=500, description="Page size.")]
Cursor = Annotated[
    str | None,
    Query(max_length=1024, description="The `next_cursor` of the previous page."),
]
IDEMPOTENCY_KEY = r"^[\x21-\x7e]+$"
IDEMPOTENCY_HELP = (
    "Makes retries safe: the same key and body within the window return the original "
    "job (200) instead of enqueuing another."
)
_key_rule = TypeAdapter(
    Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=IDEMPOTENCY_KEY)]
)
IDEMPOTENCY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": IDEMPOTENCY_HELP,
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        "pattern": IDEMPOTENCY_KEY,
        "title": "Idempotency-Key",
    },
}


def idempotency_key(request: Request) -> str | None:
    """The Idempotency-Key header, checked as the spec says."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    try:
        return _key_rule.validate_python(key)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("header", "Idempotency-Key")} for error in exc.errors()]
        ) from None


JobId = Annotated[str, Path(description="The job id.")]


@router.post(
    "",
    status_code=201,
    operation_id="enqueue_job",
    summary="Enqueue a job",
    response_model=AnyJobOut,
    openapi_extra=documented(EnqueueRequest, [IDEMPOTENCY_HEADER]),
    response_description="The job, pending. `Location` names its URL.",
    responses={
        200: {
            "model": AnyJobOut,
            "description": "A retry with an Idempotency-Key already used for the same body: "
            "the original job, in its current state.",
        },
        **responses(409, 413),
    },
)
async def enqueue_job(request: Request) -> Response:
    """Commit a job (a 201 means it is durable). Availability is now unless `available_at`
    or `available_in_ms` is given. With an `Idempotency-Key` seen before (within the
    window, 24 h by default), the same body gets the original job back with a 200, in
    whatever state it is now, and a different body gets a 422."""
    authorize(request, "enqueue")
    body = await parse(request, EnqueueRequest)
    service: QueueService = request.app.state.service
    job, created = await service.enqueue(
        body.name,
        body.payload,
        body.max_retries,
        body.available_at,
        body.available_in_ms,
        idempotency_key(request),
        body.priority,
    )
    return render.json(render.job(job), 201 if created else 200, Location=f"/jobs/{job.id}")


@router.post(
    "/batch",
    status_code=201,
    operation_id="enqueue_jobs",
    summary="Enqueue up to 1,000 jobs at once",
    response_model=JobsOut,
    response_description="The jobs, pending, in request order.",
    responses={
        200: {
            "model": JobsOut,
            "description": "A retry with an Idempotency-Key already used for the same batch: "
            "the original jobs in their current state; one deleted since shows as "
            '`{"id", "state": "deleted"}`.',
        },
        **responses(413),
    },
    openapi_extra=documented(EnqueueBatchRequest, [IDEMPOTENCY_HEADER]),
)
async def enqueue_jobs(request: Request) -> Response:
    """All or nothing, in one transaction: any invalid item is a 422 that names its index
    (`body.jobs.17.available_in_ms: ...`), a payload over the limit a 413 that names it.
    An `Idempotency-Key` covers the whole batch, in a key space of its own (apart from
    `POST /jobs`)."""
    authorize(request, "enqueue")
    body = await parse(request, EnqueueBatchRequest)
    service: QueueService = request.app.state.service
    specs = [
        JobSpec(j.name, j.payload, j.max_retries, j.available_at, j.available_in_ms, j.priority)
        for j in body.jobs
    ]
    jobs, created = await service.enqueue_batch(specs, idempotency_key(request))
    rendered = [
        render.job(job) if job is not None else {"id": job_id, "state": "deleted"}
        for job_id, job in jobs
    ]
    return render.json({"jobs": rendered}, 201 if created else 200)


@router.get(
    "",
    operation_id="list_jobs",
    dependencies=[require("read")],
    summary="List pending jobs",
    response_description="A page of pending jobs, oldest `available_at` first.",
    responses=responses(),
)
async def list_jobs(
    service: Service,
    state: Annotated[
        Literal["available", "scheduled", "reserved"] | None,
        Query(description="Only jobs in this state; all pending jobs when omitted."),
    ] = None,
    name: NameFilter = None,
    limit: Limit = 50,
    cursor: Cursor = None,
    q: Search = None,
) -> JobPage:
    """Pending jobs ordered by `available_at` (oldest first)."""
    page = await service.list_pending(state, name, limit, cursor, q)
    return JobPage(
        items=[JobOut.model_validate(j) for j in page.items], next_cursor=page.next_cursor
    )


@router.get(
    "/succeeded",
    operation_id="list_succeeded_jobs",
    dependencies=[require("read")],
    summary="List succeeded jobs",
    response_description="A page of succeeded jobs, newest first.",
    responses=responses(),
)
async def list_succeeded_jobs(
    service: Service,
    name: NameFilter = None,
    limit: Limit = 50,
    cursor: Cursor = None,
    q: Search = None,
) -> SucceededJobPage:
    """Newest first by `succeeded_at`; walking the cursors returns each row once."""
    page = await service.list_succeeded(name, limit, cursor, q)
    return SucceededJobPage.model_validate(page, from_attributes=True)


@router.get(
    "/failed",
    operation_id="list_failed_jobs",
    dependencies=[require("read")],
    summary="List failed jobs",
    response_description="A page of failed jobs, newest first.",
    responses=responses(),
)
async def list_failed_jobs(
    service: Service,
    name: NameFilter = None,
    limit: Limit = 50,
    cursor: Cursor = None,
    q: Search = None,
) -> FailedJobPage:
    """Newest first by `failed_at`; walking the cursors returns each row once."""
    page = await service.list_failed(name, limit, cursor, q)
    return FailedJobPage.model_validate(page, from_attributes=True)


@router.get(
    "/failed/groups",
    operation_id="group_failed_jobs",
    dependencies=[require("read")],
    summary="Failed jobs grouped by exception",
    response_description="Groups by the exception's first line, most frequent first.",
    responses=responses(),
)
async def group_failed_jobs(service: Service, name: NameFilter = None) -> FailureGroupsOut:
    """The newest 10,000 failed jobs (of `name`), grouped by the first line of their
    exception, with counts per job name: what is failing, at a glance."""
    groups, scanned = await service.failure_groups(name)
    return FailureGroupsOut(
        groups=[FailureGroupOut.model_validate(g, from_attributes=True) for g in groups],
        scanned=scanned,
        complete=scanned < GROUP_SCAN,
    )


@router.get(
    "/{job_id}",
    operation_id="get_job",
    dependencies=[require("read")],
    summary="Get a job",
    response_description="The job; `state` tells which shape it has.",
    responses=responses(404),
)
async def get_job(job_id: JobId, service: Service) -> AnyJobOut:
    """The job in whatever state it is now, succeeded and failed included."""
    job: AnyJob = await service.get(job_id)
    return job  # type: ignore[return-value]


@router.delete(
    "/{job_id}",
    status_code=204,
    operation_id="delete_job",
    dependencies=[require("admin")],
    summary="Cancel a pending job or delete a finished one",
    response_description="Deleted.",
    responses=responses(404, 409),
)
async def delete_job(job_id: JobId, service: Service) -> Response:
    """A reserved job is a 409: its worker holds it."""
    await service.cancel(job_id)
    return Response(status_code=204)


@router.post(
    "/{job_id}/retry",
    operation_id="retry_job",
    dependencies=[require("admin")],
    summary="Retry a failed job",
    response_description="The job, pending and available again.",
    responses=responses(404, 409),
)
async def retry_job(job_id: JobId, service: Service) -> JobOut:
    """Back to pending, available now, with `attempts` 0 and the same id, name and payload."""
    job: Job = await service.retry(job_id)
    return JobOut.model_validate(job)
