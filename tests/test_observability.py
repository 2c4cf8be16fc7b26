"""/metrics, /stats and logs, against real server processes on every backend."""

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess, enqueue, lease

Server = Callable[..., AbstractContextManager[ServerProcess]]
FAST = {"BGJOBS_REAPER_INTERVAL_MS": "50", "BGJOBS_RETRY_BASE_MS": "60000"}


@asynccontextmanager
async def serve(
    server_process: Server, db_url: str, **env: str
) -> AsyncIterator[tuple[ServerProcess, httpx.AsyncClient]]:
    with server_process(database_url=db_url, env={**FAST, **env}) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            yield server, client


async def scrape(
    client: httpx.AsyncClient, **headers: str
) -> dict[tuple[str, tuple[Any, ...]], float]:
    """Every sample of /metrics as (sample name, sorted labels) -> value."""
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[Any, ...]], float], metric: str, **labels: str) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


async def finish_one_of_each(client: httpx.AsyncClient, name: str) -> None:
    """One ack, one fail that will retry, one final fail, one lease left to expire."""
    for retries in (3, 3, 0, 0):
        await enqueue(client, name, max_retries=retries)
    leases = await lease(client, [name], max_jobs=3)
    by_retries = sorted(leases, key=lambda held: held["job"]["max_retries"], reverse=True)
    assert (await client.post(f"/leases/{by_retries[0]['id']}/ack")).status_code == 200
    for held in by_retries[1:]:
        failed = await client.post(f"/leases/{held['id']}/fail", json={"exception": "boom"})
        assert failed.status_code == 200, failed.text
    [doomed] = await lease(client, [name], lease_ms=1000)
    for _ in range(100):  # the reaper fails it soon after its lease ends
        await asyncio.sleep(0.1)
        found = (await client.get(f"/jobs/{doomed['job']['id']}")).json()
        if found["state"] == "failed":
            return
    raise AssertionError(f"the expired lease was not reaped: {found}")


async def test_counters_histograms_and_gauges_follow_the_jobs(
    server_process: Server, db_url: str
) -> None:
    async with serve(server_process, db_url) as (_, client):
        await finish_one_of_each(client, "report")
        await enqueue(client, "report", available_in_ms=3_600_000)  # scheduled
        samples = await scrape(client)
        stats = (await client.get("/stats")).json()

    def finished(outcome: str, reason: str) -> float:
        return value(
            samples, "bgjobs_jobs_finished_total", name="report", outcome=outcome, reason=reason
        )

    assert value(samples, "bgjobs_jobs_enqueued_total", name="report") == 5
    assert finished("succeeded", "ok") == 1
    assert finished("retrying", "error") == 1
    assert finished("failed", "error") == 1
    assert finished("failed", "expired") == 1
    assert value(samples, "bgjobs_job_wait_seconds_count", name="report") == 4
    assert value(samples, "bgjobs_job_run_seconds_count", name="report") == 3  # ack + 2 fails
    gauges = {
        state: value(samples, "bgjobs_jobs", name="report", state=state)
        for state in ("available", "scheduled", "reserved", "succeeded", "failed")
    }
    # The retrying job waits out its 60 s backoff: scheduled, like the delayed one.
    assert gauges == {"available": 0, "scheduled": 2, "reserved": 0, "succeeded": 1, "failed": 2}
    assert stats["names"][0]["counts"] == gauges
    assert value(samples, "bgjobs_long_polls_waiting") == 0
    ack = ("method", "POST"), ("route", "/leases/{lease_id}/ack"), ("status", "200")
    assert samples[("bgjobs_http_request_duration_seconds_count", tuple(sorted(ack)))] == 1
    enq = ("method", "POST"), ("route", "/jobs"), ("status", "201")
    assert samples[("bgjobs_http_request_duration_seconds_count", tuple(sorted(enq)))] == 5
    assert not any("id" in dict(labels) for _, labels in samples)  # no job or lease ids


async def test_gauges_match_the_database_after_every_kind_of_move(
    server_process: Server, db_url: str
) -> None:
    async with serve(server_process, db_url) as (_, client):
        for i in range(6):
            await enqueue(client, "mix", max_retries=0, payload=str(i))
        held = await lease(client, ["mix"], max_jobs=4)
        await client.post(f"/leases/{held[0]['id']}/ack")
        await client.post(f"/leases/{held[1]['id']}/fail", json={"exception": "x"})
        await client.delete(f"/leases/{held[2]['id']}")  # released: available again
        retried = await client.post(f"/jobs/{held[1]['job']['id']}/retry")
        assert retried.status_code == 200, retried.text
        ready = (await client.get("/jobs", params={"name": "mix", "state": "available"})).json()
        cancelled = await client.delete(f"/jobs/{ready['items'][0]['id']}")
        assert cancelled.status_code == 204, cancelled.text
        await asyncio.sleep(1.1)  # past the 1 s cache of counts
        samples = await scrape(client)
        truth = {
            state: len(
                (await client.get("/jobs", params={"name": "mix", "state": state})).json()["items"]
            )
            for state in ("available", "scheduled", "reserved")
        }
        for state in ("succeeded", "failed"):
            page = (await client.get(f"/jobs/{state}", params={"name": "mix"})).json()
            truth[state] = len(page["items"])
    # 6 enqueued: 1 acked, 1 failed then retried, 1 released, 1 still held, 1 cancelled.
    assert truth == {"available": 3, "scheduled": 0, "reserved": 1, "succeeded": 1, "failed": 0}
    for state, count in truth.items():
        assert value(samples, "bgjobs_jobs", name="mix", state=state) == count, state


async def test_metrics_need_the_metrics_scope(server_process: Server, db_url: str) -> None:
    tokens = "m1=metrics,r1=read,a1=admin+read+enqueue+work"
    async with serve(server_process, db_url, BGJOBS_API_TOKENS=tokens) as (_, client):
        assert (await client.get("/metrics")).status_code == 401
        bad = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401
        for token in ("r1", "a1"):
            refused = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert refused.status_code == 403, refused.text
            assert "'metrics' scope" in refused.json()["detail"]
        await scrape(client, Authorization="Bearer m1")
        stats = await client.get("/stats", headers={"Authorization": "Bearer m1"})
        assert stats.status_code == 403
        assert (
            await client.get("/stats", headers={"Authorization": "Bearer r1"})
        ).status_code == 200


async def test_job_names_past_the_cap_are_labelled_other(
    server_process: Server, db_url: str
) -> None:
    async with serve(server_process, db_url, BGJOBS_METRICS_MAX_NAMES="2") as (_, client):
        for name in ("alpha", "beta", "gamma", "delta", "gamma"):
            await enqueue(client, name)
        samples = await scrape(client)
    enqueued = {
        dict(labels)["name"]: count
        for (sample, labels), count in samples.items()
        if sample == "bgjobs_jobs_enqueued_total"
    }
    assert enqueued == {"alpha": 1, "beta": 1, "_other": 3}
    assert value(samples, "bgjobs_jobs", name="_other", state="available") == 3


async def test_stats_counts_ages_and_recent_finishes(server_process: Server, db_url: str) -> None:
    async with serve(server_process, db_url) as (_, client):
        await finish_one_of_each(client, "report")
        await enqueue(client, "email")
        await enqueue(client, "email")
        await asyncio.sleep(0.3)  # the oldest email job has waited at least this long
        await asyncio.sleep(1.0)  # past the 1 s cache of counts
        stats = (await client.get("/stats")).json()
        only = (await client.get("/stats", params={"name": "email", "series": "5m"})).json()
        bad = [
            await client.get("/stats", params={"series": s})
            for s in ("0m", "1441m", "60", "abc", "-5m", "1.5m")
        ]

    assert set(stats) == {"server", "totals", "names"}
    assert stats["server"]["backend"] == ("sqlite" if "sqlite" in db_url else "postgresql")
    assert stats["server"]["version"]
    assert [n["name"] for n in stats["names"]] == ["email", "report"]
    email, report = stats["names"]
    assert email["counts"] == {
        "available": 2, "scheduled": 0, "reserved": 0, "succeeded": 0, "failed": 0
    }  # fmt: skip
    assert email["oldest_available_age_ms"] >= 1300
    assert email["last_minute"] == email["last_hour"] == {"succeeded": 0, "failed": 0}
    assert report["counts"] == {
        "available": 0, "scheduled": 1, "reserved": 0, "succeeded": 1, "failed": 2
    }  # fmt: skip
    assert report["oldest_available_age_ms"] is None
    assert report["last_minute"] == report["last_hour"] == {"succeeded": 1, "failed": 2}
    totals = stats["totals"]
    assert totals["counts"] == {
        "available": 2, "scheduled": 1, "reserved": 0, "succeeded": 1, "failed": 2
    }  # fmt: skip
    assert totals["oldest_available_age_ms"] == email["oldest_available_age_ms"]
    assert totals["last_hour"] == {"succeeded": 1, "failed": 2}

    assert [n["name"] for n in only["names"]] == ["email"]
    assert only["totals"]["counts"] == email["counts"]
    series = only["series"]
    assert len(series) == 5 and all(set(m) == {"minute", "succeeded", "failed"} for m in series)
    assert [m["minute"] for m in series] == sorted(m["minute"] for m in series)
    assert all(m["minute"].endswith(":00Z") for m in series)
    assert sum(m["succeeded"] + m["failed"] for m in series) == 0  # email: none finished
    for response in bad:
        assert response.status_code == 422, response.text
        assert "series" in response.text


async def test_stats_series_counts_every_finish_in_its_minute(
    server_process: Server, db_url: str
) -> None:
    async with serve(server_process, db_url) as (_, client):
        await finish_one_of_each(client, "report")
        stats = (await client.get("/stats", params={"series": "60m"})).json()
    series = stats["series"]
    assert len(series) == 60
    assert sum(m["succeeded"] for m in series) == 1
    assert sum(m["failed"] for m in series) == 2  # the retrying attempt is not counted


async def test_json_logs_carry_request_ids_and_never_tokens_or_payloads(
    server_process: Server, db_url: str
) -> None:
    secret_token = "tok-7f3a9c1e5b"
    secret_payload = "card=4111-1111-1111-1111"
    env = {
        "BGJOBS_LOG_FORMAT": "json",
        "BGJOBS_ACCESS_LOG": "true",
        "BGJOBS_API_TOKENS": f"{secret_token}=enqueue+work+read+admin",
    }
    auth = {"Authorization": f"Bearer {secret_token}"}
    async with serve(server_process, db_url, **env) as (server, client):
        sent = await client.post(
            "/jobs",
            json={"name": "charge", "payload": secret_payload, "max_retries": 0},
            headers={**auth, "X-Request-ID": "req-abc-123"},
        )
        assert sent.status_code == 201, sent.text
        assert sent.headers["x-request-id"] == "req-abc-123"
        made_up = await client.get("/healthz", headers={"X-Request-ID": "x" * 201})
        generated = made_up.headers["x-request-id"]
        assert generated and generated != "x" * 201
        [held] = await lease(httpx_client_with(client, auth), ["charge"])
        failed = await client.post(
            f"/leases/{held['id']}/fail", json={"exception": "declined"}, headers=auth
        )
        assert failed.status_code == 200
        retried = await client.post(f"/jobs/{held['job']['id']}/retry", headers=auth)
        assert retried.status_code == 200
        await client.get("/jobs", headers={"Authorization": "Bearer wrong-token"})
    output = server.output()
    assert secret_token not in output and "wrong-token" not in output
    assert secret_payload not in output and "4111" not in output
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    access = [line for line in lines if line["logger"] == "bgjobs.access"]
    [enqueued] = [line for line in access if line["request_id"] == "req-abc-123"]
    assert enqueued["method"] == "POST" and enqueued["route"] == "/jobs"
    assert enqueued["status"] == 201 and enqueued["duration_ms"] >= 0
    assert any(line["request_id"] == generated for line in access)
    assert any(line["route"] == "/leases/{lease_id}/fail" for line in access)
    assert any(line["status"] == 401 for line in access)
    events = {line.get("event"): line for line in lines if line["logger"] == "bgjobs.jobs"}
    for event in ("moved_to_failed", "retried_from_failed"):
        assert events[event]["job_id"] == held["job"]["id"]
        assert events[event]["job_name"] == "charge"


def httpx_client_with(client: httpx.AsyncClient, headers: dict[str, str]) -> httpx.AsyncClient:
    client.headers.update(headers)
    return client


async def test_text_logs_say_when_a_lease_expired(server_process: Server, db_url: str) -> None:
    async with serve(server_process, db_url) as (server, client):
        await enqueue(client, "slow", max_retries=0)
        [held] = await lease(client, ["slow"], lease_ms=1000)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if (await client.get(f"/jobs/{held['job']['id']}")).json()["state"] == "failed":
                break
    output = server.output()
    job_id = held["job"]["id"]
    assert f"job {job_id} (slow): lease expired" in output, output
    assert f"job {job_id} (slow) moved to failed" in output, output
    assert "POST /leases/{lease_id}/ack" not in output  # no ack was sent
    assert "POST /jobs 201" in output, output
