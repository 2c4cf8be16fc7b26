"""/schedules: recurring schedules that enqueue jobs at fixed intervals or cron times."""

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response

from app.api.auth import require
from app.api.deps import Service
from app.api.errors import responses
from app.api.schemas import SCHEDULE_ID_PATTERN, ScheduleOut, ScheduleRequest, SchedulesOut
from app.queue.scheduler import ScheduleSpec
from app.queue.schedules import Schedule

router = APIRouter(prefix="/schedules", tags=["schedules"])


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out = responses(*statuses)
    if 404 in out:
        out[404] = {**out[404], "description": "No schedule with this id."}
    return out


ScheduleIdPath = Annotated[
    str,
    Path(
        pattern=SCHEDULE_ID_PATTERN,
        description="Chosen by you: 1..255 characters of A-Z a-z 0-9 _ . : -",
        examples=["nightly-report"],
    ),
]


def _out(schedule: Schedule) -> ScheduleOut:
    return ScheduleOut.model_validate(asdict(schedule))


@router.put(
    "/{schedule_id}",
    operation_id="put_schedule",
    dependencies=[require("admin")],
    summary="Create or update a schedule",
    status_code=200,
    responses={
        201: {"model": ScheduleOut, "description": "Created."},
        **_responses(404, 413),
    },
)
async def put_schedule(
    schedule_id: ScheduleIdPath, body: ScheduleRequest, service: Service, response: Response
) -> ScheduleOut:
    """Idempotent: 201 when it creates the schedule, 200 when it replaces one. Changing the
    timing (`interval_ms`, `cron`, `timezone`) re-anchors it at this request's time; any
    other change keeps its rhythm and its next run. Jobs already enqueued are not changed."""
    timezone = body.timezone or ("UTC" if body.cron is not None else None)
    spec = ScheduleSpec(
        body.name, body.payload, body.max_retries, body.priority, body.interval_ms,
        body.cron, timezone, body.paused, body.skip_if_running,
    )  # fmt: skip
    schedule, created = await service.schedules.put(schedule_id, spec)
    if created:
        response.status_code = 201
    return _out(schedule)


@router.get(
    "",
    operation_id="list_schedules",
    dependencies=[require("read")],
    summary="Every schedule",
    responses=responses(),
)
async def list_schedules(service: Service) -> SchedulesOut:
    return SchedulesOut(schedules=[_out(s) for s in await service.schedules.list()])


@router.get(
    "/{schedule_id}",
    operation_id="get_schedule",
    dependencies=[require("read")],
    summary="One schedule, with its next and last runs",
    responses=_responses(404),
)
async def get_schedule(schedule_id: ScheduleIdPath, service: Service) -> ScheduleOut:
    return _out(await service.schedules.get(schedule_id))


@router.delete(
    "/{schedule_id}",
    operation_id="delete_schedule",
    dependencies=[require("admin")],
    summary="Delete a schedule",
    status_code=204,
    responses=_responses(404),
)
async def delete_schedule(schedule_id: ScheduleIdPath, service: Service) -> Response:
    """Nothing more is enqueued for it; the jobs it already enqueued stay."""
    await service.schedules.delete(schedule_id)
    return Response(status_code=204)
