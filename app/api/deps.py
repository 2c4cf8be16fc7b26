"""Dependencies shared by the routes."""

from typing import Annotated

from fastapi import Depends, Request

from app.queue.service import QueueService


async def get_service(request: Request) -> QueueService:
    service: QueueService = request.app.state.service
    return service


Service = Annotated[QueueService, Depends(get_service)]
