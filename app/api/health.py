"""Liveness and readiness probes."""

from fastapi import APIRouter

from app.api.deps import Service
from app.api.errors import responses
from app.api.schemas import Status

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="healthz", summary="The process is alive")
async def healthz() -> Status:
    return Status(status="ok")


@router.get(
    "/readyz",
    operation_id="readyz",
    summary="The database is reachable",
    responses={503: responses()[503]},
)
async def readyz(service: Service) -> Status:
    await service.ping()
    return Status(status="ready")
