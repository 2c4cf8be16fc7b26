"""GET /metrics for Prometheus and GET /stats for dashboards and `bgjobs stats`."""

import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api import render
from app.api.auth import require
from app.api.deps import Service
from app.api.errors import responses
from app.api.jobs import NameFilter
from app.api.metrics import Metrics
from app.api.schemas import StatsOut
from app.queue.ports import Finished
from app.queue.service import NameStats

router = APIRouter(tags=["observability"])

SERIES = re.compile(r"^([1-9][0-9]{0,3})m$")
SERIES_PATTERN = r"^([1-9][0-9]{0,2}|1[0-3][0-9]{2}|14[0-3][0-9]|1440)m$"
MAX_SERIES_MINUTES = 1440
METRICS_EXAMPLE = """\
# HELP bgjobs_jobs_enqueued_total Jobs enqueued.
# TYPE bgjobs_jobs_enqueued_total counter
bgjobs_jobs_enqueued_total{name="send_email"} 42.0
# HELP bgjobs_jobs Jobs by name and state, from the database (the same on every replica).
# TYPE bgjobs_jobs gauge
bgjobs_jobs{name="send_email",state="available"} 3.0
"""


@router.get(
    "/metrics",
    operation_id="get_metrics",
    dependencies=[require("metrics")],
    summary="Prometheus metrics",
    response_class=Response,
    response_description="Prometheus text exposition format.",
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}, "example": METRICS_EXAMPLE}}
        },
        **responses(),
    },
)
async def get_metrics(request: Request, service: Service) -> Response:
    """Counters and histograms of this process (sum them across replicas), and job counts
    by name and state from the database (the same on every replica: take the max). Needs
    the `metrics` scope when API tokens are on; it never shows a payload."""
    metrics: Metrics = request.app.state.metrics
    metrics.job_counts = await service.job_counts()
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def series_minutes(series: str | None) -> int | None:
    """`60m` -> 60; None when not asked for; a 422 that says why for anything else."""
    if series is None:
        return None
    found = SERIES.match(series)
    minutes = int(found.group(1)) if found else 0
    if not 1 <= minutes <= MAX_SERIES_MINUTES:
        msg = (
            f"series must be a whole number of minutes from 1 to {MAX_SERIES_MINUTES} "
            f"followed by m (like 60m), not {series!r}"
        )
        raise RequestValidationError(
            [{"loc": ("query", "series"), "msg": msg, "type": "value_error", "input": series}]
        )
    return minutes


@router.get(
    "/stats",
    operation_id="get_stats",
    dependencies=[require("read")],
    summary="Job counts for dashboards",
    response_model=StatsOut,
    response_description="Counts by state, oldest wait and recent finishes, per name and in total.",
    responses=responses(),
)
async def get_stats(
    request: Request,
    service: Service,
    name: NameFilter = None,
    series: Annotated[
        str | None,
        Query(
            max_length=16,
            description="Finishes per minute over the last N minutes: `Nm`, N from 1 to 1440.",
            examples=["60m"],
            # In the spec only: the route refuses anything else with a detail that says
            # what it wants, clearer than "should match pattern".
            json_schema_extra={"pattern": SERIES_PATTERN},
        ),
    ] = None,
) -> Response:
    """Counts by state come from counts the database keeps as jobs move (read at most
    once a second), finishes from per-minute counts written with each ack and fail:
    cheap at any backlog."""
    stats = await service.stats(name, series_minutes(series))
    body: dict[str, Any] = {
        "server": request.app.state.server_info,
        "totals": _name_stats(stats.totals),
        "names": [{"name": n.name, **_name_stats(n)} for n in stats.names],
    }
    if stats.series is not None:
        body["series"] = [_minute(f) for f in stats.series]
    return render.json(body)


def _name_stats(stats: NameStats) -> dict[str, Any]:
    c = stats.counts
    return {
        "counts": {
            "available": c.available,
            "scheduled": c.scheduled,
            "reserved": c.reserved,
            "succeeded": c.succeeded,
            "failed": c.failed,
        },
        "oldest_available_age_ms": stats.oldest_available_age_ms,
        "last_minute": _finished(stats.last_minute),
        "last_hour": _finished(stats.last_hour),
    }


def _finished(f: Finished) -> dict[str, int]:
    return {"succeeded": f.succeeded, "failed": f.failed}


def _minute(f: Finished) -> dict[str, Any]:
    assert isinstance(f.key, datetime)
    return {"minute": f.key.strftime("%Y-%m-%dT%H:%M:00Z"), **_finished(f)}
