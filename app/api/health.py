"""Liveness and readiness probes."""

from fastapi import APIRouter

from app.api.deps import Service
from app.api.errors import responses
from app.api.schemas import Status

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    operation_id="healthz",
    summary="The process is alive",
    response_description="Always ok while the process serves requests.",
)
async def healthz() -> Status:
    """Liveness: answers without touching the database."""
    return Status(status="ok")


@router.get(
    "/readyz",
    operation_id="readyz",
    summary="The database is reachable",
    response_description="Ready to serve; a 503 with a detail when the database is not.",
    responses={503: responses()[503]},  # open: probes carry no token
)
async def readyz(service: Service) -> Status:
    """Readiness: the database answers a query."""
    await service.ping()
    return Status(status="ready")
