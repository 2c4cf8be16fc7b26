"""/leases: workers reserve jobs (long-polling), then ack, fail, extend or release them,
one at a time or up to 1,000 in one call."""

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response

from app.api import render
from app.api.auth import authorize, require
from app.api.body import documented, parse
from app.api.deps import Service
from app.api.errors import responses, status_of
from app.api.schemas import (
    AckResultsOut,
    ExtendBatchRequest,
    ExtendOut,
    ExtendRequest,
    ExtendResultsOut,
    FailBatchRequest,
    FailOut,
    FailRequest,
    FailResultsOut,
    LeaseIdsRequest,
    LeaseRequest,
    LeasesOut,
    SucceededJobOut,
)
from app.queue.models import SucceededJob
from app.queue.service import QueueService

router = APIRouter(prefix="/leases", tags=["leases"])
WORK = [require("work")]

LeaseId = Annotated[str, Path(description="The lease id from POST /leases.")]
FENCED = responses(404, 409)
BATCH = responses()


def _service(request: Request) -> QueueService:
    service: QueueService = request.app.state.service
    return service


def _succeeded(job: SucceededJob) -> dict[str, Any]:
    return {"job": render.job(job)}


def _results(ids: list[str], results: list[Any], ok: Callable[[Any], dict[str, Any]]) -> Response:
    items = [render.item(i, r, status_of, ok) for i, r in zip(ids, results, strict=True)]
    return render.json({"results": items})


@router.post(
    "",
    operation_id="lease_jobs",
    summary="Reserve jobs (long poll)",
    response_model=LeasesOut,
    response_description="The leases granted; an empty list when the wait ended with none.",
    responses=responses(),
    openapi_extra=documented(LeaseRequest),
)
async def lease_jobs(request: Request) -> Response:
    """Reserve up to `max_jobs` (1..1,000) available jobs of `names`, oldest first. With none
    available, wait up to `wait_ms` and answer as soon as one is enqueued or comes due, or
    with an empty list when the wait ends. Fewer leases come back when their payloads would
    pass `BGJOBS_MAX_RESPONSE_BYTES`, but always at least one when one is ready."""
    authorize(request, "work")
    body = await parse(request, LeaseRequest)
    leases = await _service(request).lease(
        body.worker_id,
        body.names,
        body.max_jobs,
        body.wait_ms,
        body.lease_ms,
        hangup=lambda: hung_up(request),
    )
    return render.json({"leases": [render.lease(lease) for lease in leases]})


async def hung_up(request: Request) -> None:
    """Returns once the client has hung up. The body has been read, so the server's next
    message is the disconnect (or the end of this response, when the waiter is gone)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post(
    "/ack",
    operation_id="ack_leases",
    summary="Many jobs succeeded",
    response_model=AckResultsOut,
    response_description="One result per id, in request order: the succeeded job (status "
    "200) or why not (404 or 409 with `code`).",
    responses=BATCH,
    openapi_extra=documented(LeaseIdsRequest),
)
async def ack_leases(request: Request) -> Response:
    """Each id by the rules of `POST /leases/{id}/ack`, all in one transaction. A repeated
    id is a 422 and changes nothing."""
    authorize(request, "work")
    ids = (await parse(request, LeaseIdsRequest)).ids
    return _results(ids, await _service(request).ack_many(ids), _succeeded)


@router.post(
    "/fail",
    operation_id="fail_leases",
    summary="Many jobs failed",
    response_model=FailResultsOut,
    response_description="One result per item, in request order: `outcome` and `job` "
    "(status 200) or why not (404 or 409 with `code`).",
    responses=BATCH,
    openapi_extra=documented(FailBatchRequest),
)
async def fail_leases(request: Request) -> Response:
    """Each item by the rules of `POST /leases/{id}/fail`, all in one transaction."""
    authorize(request, "work")
    body = await parse(request, FailBatchRequest)
    items = [(item.id, item.exception, item.retry_in_ms) for item in body.items]
    results = await _service(request).fail_many(items)
    return _results([item.id for item in body.items], results, render.fail_outcome)


@router.post(
    "/extend",
    operation_id="extend_leases",
    summary="Heartbeat for many leases",
    response_model=ExtendResultsOut,
    response_description="One result per id, in request order: the new `expires_at` "
    "(status 200) or why not (404 or 409 with `code`).",
    responses=BATCH,
    openapi_extra=documented(ExtendBatchRequest),
)
async def extend_leases(request: Request) -> Response:
    """For a worker holding many leases: each one that is still live now ends `lease_ms`
    from now, by the rules of `POST /leases/{id}/extend`."""
    authorize(request, "work")
    body = await parse(request, ExtendBatchRequest)
    results = await _service(request).extend_many(body.ids, body.lease_ms)
    return _results(body.ids, results, render.expiry)


@router.post(
    "/{lease_id}/ack",
    operation_id="ack_lease",
    summary="The job succeeded",
    response_model=SucceededJobOut,
    response_description="The job, now succeeded.",
    responses=FENCED,
    openapi_extra={"security": [{"HTTPBearer": []}]},
)
async def ack_lease(lease_id: LeaseId, request: Request) -> Response:
    """Moves the job to the succeeded jobs, keeping its id. A repeated ack with the lease
    that finished the job is a 409 with code `finished_by_this_lease` and the job."""
    authorize(request, "work")
    return render.json(render.job(await _service(request).ack(lease_id)))


@router.post(
    "/{lease_id}/fail",
    operation_id="fail_lease",
    summary="The job failed",
    response_model=FailOut,
    response_description="`retrying` with the pending job, or `failed` with the failed job.",
    responses=FENCED,
    dependencies=WORK,
)
async def fail_lease(lease_id: LeaseId, body: FailRequest, service: Service) -> Response:
    """With retries left the job is pending again after `retry_in_ms` or the default backoff;
    otherwise it moves to the failed jobs with the exception text."""
    outcome = await service.fail(lease_id, body.exception, body.retry_in_ms)
    return render.json(render.fail_outcome(outcome))


@router.post(
    "/{lease_id}/extend",
    operation_id="extend_lease",
    summary="Heartbeat",
    response_model=ExtendOut,
    response_description="The lease and its new expiry.",
    responses=FENCED,
    dependencies=WORK,
)
async def extend_lease(lease_id: LeaseId, body: ExtendRequest, service: Service) -> Response:
    """The lease now expires `lease_ms` from now."""
    expires_at = await service.extend(lease_id, body.lease_ms)
    return render.json({"id": lease_id, **render.expiry(expires_at)})


@router.delete(
    "/{lease_id}",
    status_code=204,
    operation_id="release_lease",
    summary="Give the job back",
    response_description="Released.",
    responses=FENCED,
    dependencies=WORK,
)
async def release_lease(lease_id: LeaseId, service: Service) -> Response:
    """For a worker shutting down: the job is available again at once and this attempt is
    not counted."""
    await service.release(lease_id)
    return Response(status_code=204)
