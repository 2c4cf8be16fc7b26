"""/leases: workers reserve jobs (long-polling), then ack, fail, extend or release them."""

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from app.api.auth import require
from app.api.deps import Service
from app.api.errors import responses
from app.api.schemas import (
    BuriedOut,
    ExtendOut,
    ExtendRequest,
    FailedJobOut,
    FailOut,
    FailRequest,
    JobOut,
    LeaseOut,
    LeaseRequest,
    LeasesOut,
    RetryingOut,
    SucceededJobOut,
)
from app.queue.models import Retrying

router = APIRouter(prefix="/leases", tags=["leases"], dependencies=[require("work")])

LeaseId = Annotated[str, Path(description="The lease id from POST /leases.")]
FENCED = responses(404, 409)


@router.post(
    "",
    operation_id="lease_jobs",
    summary="Reserve jobs (long poll)",
    response_description="The leases granted; an empty list when the wait ended with none.",
    responses=responses(),
)
async def lease_jobs(body: LeaseRequest, request: Request, service: Service) -> LeasesOut:
    """Reserve up to `max_jobs` available jobs of `names`, oldest first. With none available,
    wait up to `wait_ms` and answer as soon as one is enqueued or comes due, or with an empty
    list when the wait ends."""
    leases = await service.lease(
        body.worker_id,
        body.names,
        body.max_jobs,
        body.wait_ms,
        body.lease_ms,
        gone=request.is_disconnected,
    )
    return LeasesOut(leases=[LeaseOut.model_validate(lease) for lease in leases])


@router.post(
    "/{lease_id}/ack",
    operation_id="ack_lease",
    summary="The job succeeded",
    response_description="The job, now succeeded.",
    responses=FENCED,
)
async def ack_lease(lease_id: LeaseId, service: Service) -> SucceededJobOut:
    """Moves the job to the succeeded jobs, keeping its id."""
    return SucceededJobOut.model_validate(await service.ack(lease_id))


@router.post(
    "/{lease_id}/fail",
    operation_id="fail_lease",
    summary="The job failed",
    response_description="`retrying` with the pending job, or `failed` with the failed job.",
    responses=FENCED,
)
async def fail_lease(lease_id: LeaseId, body: FailRequest, service: Service) -> FailOut:
    """With retries left the job is pending again after `retry_in_ms` or the default backoff;
    otherwise it moves to the failed jobs with the exception text."""
    outcome = await service.fail(lease_id, body.exception, body.retry_in_ms)
    if isinstance(outcome, Retrying):
        return RetryingOut(job=JobOut.model_validate(outcome.job))
    return BuriedOut(job=FailedJobOut.model_validate(outcome.job))


@router.post(
    "/{lease_id}/extend",
    operation_id="extend_lease",
    summary="Heartbeat",
    response_description="The lease and its new expiry.",
    responses=FENCED,
)
async def extend_lease(lease_id: LeaseId, body: ExtendRequest, service: Service) -> ExtendOut:
    """The lease now expires `lease_ms` from now."""
    expires_at = await service.extend(lease_id, body.lease_ms)
    return ExtendOut(id=lease_id, expires_at=expires_at)


@router.delete(
    "/{lease_id}",
    status_code=204,
    operation_id="release_lease",
    summary="Give the job back",
    response_description="Released.",
    responses=FENCED,
)
async def release_lease(lease_id: LeaseId, service: Service) -> Response:
    """For a worker shutting down: the job is available again at once and this attempt is
    not counted."""
    await service.release(lease_id)
    return Response(status_code=204)
