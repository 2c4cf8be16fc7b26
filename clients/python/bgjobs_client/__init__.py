"""Client, worker and command line for bgjobs-server, an HTTP job queue."""

from bgjobs_client.client import AsyncClient, Client
from bgjobs_client.errors import ApiError, BgjobsError, Unreachable
from bgjobs_client.models import FailOutcome, ItemResult, Job, Lease, Page
from bgjobs_client.worker import HandlerTimeout, RetryIn, Worker

__all__ = [
    "ApiError",
    "AsyncClient",
    "BgjobsError",
    "Client",
    "FailOutcome",
    "HandlerTimeout",
    "ItemResult",
    "Job",
    "Lease",
    "Page",
    "RetryIn",
    "Unreachable",
    "Worker",
]
