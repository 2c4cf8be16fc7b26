"""Enqueue, lease, ack, fail and list failed jobs with the client that openapi-python-client
generates from openapi/openapi.json (the package bgjobs_server_client). Every optional
field is left out, except the max_retries that makes the second job fail for good."""

import os
from typing import TypeVar

from bgjobs_server_client import AuthenticatedClient
from bgjobs_server_client.api.jobs import enqueue_job, list_failed_jobs
from bgjobs_server_client.api.leases import ack_lease, fail_lease, lease_jobs
from bgjobs_server_client.models import (
    BuriedOut,
    EnqueueRequest,
    FailedJobPage,
    FailRequest,
    JobOut,
    LeaseRequest,
    LeasesOut,
    SucceededJobOut,
)

T = TypeVar("T")

client = AuthenticatedClient(
    base_url=os.environ.get("BGJOBS_URL", "http://127.0.0.1:8000"),
    token=os.environ.get("BGJOBS_TOKEN", "none"),
)


def ok(answer: object, kind: type[T]) -> T:
    """The expected body; an error body (the generated calls return those too) stops here."""
    if not isinstance(answer, kind):
        raise SystemExit(f"expected {kind.__name__}, got {answer!r}")
    return answer


def lease_one() -> str:
    """Reserve one send_email job: it was enqueued just before, so there is no need to wait."""
    body = LeaseRequest(worker_id="worker-1", names=["send_email"])
    return ok(lease_jobs.sync(client=client, body=body), LeasesOut).leases[0].id


first = ok(
    enqueue_job.sync(
        client=client, body=EnqueueRequest(name="send_email", payload='{"to": "ada@example.com"}')
    ),
    JobOut,
)
print(f"enqueued {first.id} {first.state}")
acked = ok(ack_lease.sync(lease_one(), client=client), SucceededJobOut)
print(f"acked {acked.id} {acked.state}")

second = ok(
    enqueue_job.sync(
        client=client,
        body=EnqueueRequest(name="send_email", payload='{"to": "bob@example.com"}', max_retries=0),
    ),
    JobOut,
)
print(f"enqueued {second.id} {second.state}")
body = FailRequest(exception="SMTP server said 550: no such user")
failed = ok(fail_lease.sync(lease_one(), client=client, body=body), BuriedOut)
print(f"failed {failed.job.id} {failed.outcome}")

page = ok(list_failed_jobs.sync(client=client, limit=10), FailedJobPage)
for job in page.items:
    print(f"listed failed {job.id}: {job.exception}")
