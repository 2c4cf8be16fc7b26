"""/queues: each job name as a queue, with its settings (paused or not) and its counts."""

from typing import Annotated

from fastapi import APIRouter, Path

from app.api.auth import require
from app.api.deps import Service
from app.api.errors import responses
from app.api.schemas import QueueOut, QueuePatch, QueuesOut
from app.queue.errors import NotFound
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
    return QueueOut.model_validate({"name": info.name, "paused": info.paused, "counts": counts})


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
    summary="Pause or resume a job name",
    responses=responses(404),
)
async def update_queue(name: NamePath, body: QueuePatch, service: Service) -> QueueOut:
    """Change the settings given (an absent key is unchanged): `paused` stops leasing this
    name's jobs on every replica at once, and resuming wakes its waiting polls. The answer
    is the queue as it is now."""
    if body.paused is not None:
        await service.set_paused(name, body.paused)
    return await get_queue(name, service)
