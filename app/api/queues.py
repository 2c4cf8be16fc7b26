"""/queues: each job name as a queue, with its settings (paused, limits) and its counts."""

from typing import Annotated

from fastapi import APIRouter, Path

from app.api.auth import require
from app.api.deps import Service
from app.api.errors import responses
from app.api.schemas import QueueOut, QueuePatch, QueuesOut
from app.queue.errors import NotFound
from app.queue.models import KEEP, QueueChange, RateLimit
from app.queue.service import QueueInfo

router = APIRouter(prefix="/queues", tags=["queues"])

NamePath = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:\-]{1,255}$", description="The job name.")]


def _out(info: QueueInfo) -> QueueOut:
    c = info.counts
    counts = {
        "available": c.available,
        "scheduled": c.scheduled,
        "reserved": c.reserved,
        "succeeded": c.succeeded,
        "failed": c.failed,
    }
    settings = info.settings
    rate = settings.rate_limit
    return QueueOut.model_validate(
        {
            "name": info.name,
            "paused": settings.paused,
            "concurrency_limit": settings.concurrency_limit,
            "rate_limit": None if rate is None else {"count": rate.count, "per_ms": rate.per_ms},
            "counts": counts,
        }
    )


@router.get(
    "",
    operation_id="list_queues",
    dependencies=[require("read")],
    summary="Every job name with jobs or settings",
    responses=responses(),
)
async def list_queues(service: Service) -> QueuesOut:
    """One entry per job name that has jobs or settings of its own, sorted by name."""
    return QueuesOut(queues=[_out(info) for info in await service.queues()])


@router.get(
    "/{name}",
    operation_id="get_queue",
    dependencies=[require("read")],
    summary="One job name's settings and counts",
    responses=responses(404),
)
async def get_queue(name: NamePath, service: Service) -> QueueOut:
    """404 for a name with neither jobs nor settings."""
    found = await service.queues(name)
    if not found:
        raise NotFound(f"no jobs or settings for the name {name!r}")
    return _out(found[0])


@router.patch(
    "/{name}",
    operation_id="update_queue",
    dependencies=[require("admin")],
    summary="Pause, resume or limit a job name",
    responses=responses(404),
)
async def update_queue(name: NamePath, body: QueuePatch, service: Service) -> QueueOut:
    """Change the settings given (an absent key is unchanged, null removes a limit), on
    every replica at once: `paused` stops leasing this name's jobs, `concurrency_limit`
    caps its live leases, `rate_limit` paces them. A resume or a loosened limit wakes
    waiting polls. The answer is the queue as it is now."""
    given = body.model_fields_set
    rate = body.rate_limit
    change = QueueChange(
        paused=body.paused if body.paused is not None else KEEP,
        concurrency_limit=body.concurrency_limit if "concurrency_limit" in given else KEEP,
        rate_limit=(None if rate is None else RateLimit(rate.count, rate.per_ms))
        if "rate_limit" in given
        else KEEP,
    )
    if given:
        await service.configure_queue(name, change)
    return await get_queue(name, service)
