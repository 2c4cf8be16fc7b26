"""The `bgjobs` command line against a real server: `bgjobs work` running a shell script,
and the operator commands, checked by their output."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess

BGJOBS = str(Path(sys.executable).parent / "bgjobs")


@pytest.fixture
def server(server_process: Any, tmp_path: Path) -> Iterator[ServerProcess]:
    with server_process(env={"BGJOBS_RETRY_BASE_MS": "100"}) as running:
        yield running


def bgjobs(
    server: ServerProcess, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BGJOBS_URL": server.url}
    return subprocess.run(
        [BGJOBS, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def ok(server: ServerProcess, *args: str, stdin: str | None = None) -> str:
    result = bgjobs(server, *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return result.stdout


JOB_SCRIPT = """\
#!/bin/sh
# One job: what it does depends on its payload.
payload=$(cat)
echo "$BGJOBS_JOB_ID $BGJOBS_JOB_NAME $BGJOBS_ATTEMPTS $BGJOBS_MAX_RETRIES $payload" >> "$RUNS"
case "$payload" in
  ok-*) exit 0 ;;
  flaky-*) if [ "$BGJOBS_ATTEMPTS" = 1 ]; then echo "flaky the first time" >&2; exit 3; fi ;;
  bad-*) echo "no such user: $payload" >&2; exit 7 ;;
  slow-*) exec sleep 60 ;;
  stubborn-*) trap '' TERM; sleep 60 ;;
esac
"""


def test_bgjobs_work_runs_a_script_per_job(server: ServerProcess, tmp_path: Path) -> None:
    """50 jobs: exit 0, a non-zero exit that succeeds on retry, a non-zero exit with no
    retries left, and timeouts (one that obeys SIGTERM, one that needs SIGKILL)."""
    script = tmp_path / "job.sh"
    script.write_text(JOB_SCRIPT)
    script.chmod(0o755)
    runs = tmp_path / "runs.txt"
    kinds = ["ok"] * 36 + ["flaky"] * 5 + ["bad"] * 5 + ["slow"] * 2 + ["stubborn"] * 2
    jobs = {}
    for i, kind in enumerate(kinds):
        retries = "3" if kind == "flaky" else "0"
        out = ok(
            server,
            "enqueue",
            "shell",
            "--payload",
            f"{kind}-{i}",
            "--max-retries",
            retries,
            "--json",
        )
        jobs[f"{kind}-{i}"] = json.loads(out)["id"]
    worker = subprocess.Popen(
        [BGJOBS, "work", "--url", server.url, "--name", "shell", "--concurrency", "8",
         "--timeout", "1", "--", str(script)],
        env={**os.environ, "RUNS": str(runs)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and finished(server) < 50:
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, log = worker.communicate(timeout=60)
    assert worker.returncode == 0, log
    states = {payload: job_of(server, job_id) for payload, job_id in jobs.items()}
    for payload, job in states.items():
        kind = payload.split("-")[0]
        if kind in ("ok", "flaky"):
            assert job["state"] == "succeeded", (payload, job)
            assert job["attempts"] == (2 if kind == "flaky" else 1)
        else:
            assert job["state"] == "failed", (payload, job)
    for payload in (p for p in states if p.startswith("bad")):
        assert states[payload]["exception"].startswith("CommandFailed: exit status 7\n")
        assert f"no such user: {payload}" in states[payload]["exception"]
    for payload in (p for p in states if p.startswith(("slow", "stubborn"))):
        assert "timed out after 1 s" in states[payload]["exception"]
    lines = [line.split(" ") for line in runs.read_text().splitlines()]
    assert Counter(payload.split("-")[0] for *_, payload in lines) == Counter(
        {"ok": 36, "flaky": 10, "bad": 5, "slow": 2, "stubborn": 2}
    )
    for job_id, name, attempts, max_retries, payload in lines:
        assert (job_id, name) == (jobs[payload], "shell")
        assert max_retries == ("3" if payload.startswith("flaky") else "0")
        assert attempts in ("1", "2")
    stragglers = subprocess.run(["pgrep", "-f", "sleep 60"], capture_output=True, text=True)
    assert stragglers.stdout == "", "a timed-out command's process group was not stopped"


def finished(server: ServerProcess) -> int:
    counts = 0
    for state in ("succeeded", "failed"):
        counts += len(
            httpx.get(f"{server.url}/jobs/{state}", params={"limit": 200}).json()["items"]
        )
    return counts


def job_of(server: ServerProcess, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = httpx.get(f"{server.url}/jobs/{job_id}").json()
    return job


def test_work_needs_a_command(server: ServerProcess) -> None:
    result = bgjobs(server, "work", "--name", "n")
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "bgjobs: work needs a command after --, e.g. bgjobs work --name N -- ./job.sh"
    )


def test_operator_commands(server: ServerProcess, tmp_path: Path) -> None:
    first = json.loads(ok(server, "enqueue", "mail", "--payload", "to ada", "--json"))
    assert (first["name"], first["payload"], first["state"]) == ("mail", "to ada", "available")
    piped = json.loads(ok(server, "enqueue", "mail", "--json", stdin="from stdin"))
    assert piped["payload"] == "from stdin"
    file = tmp_path / "payload.json"
    file.write_text('{"big": true}')
    filed = json.loads(ok(server, "enqueue", "mail", "--payload-file", str(file), "--json"))
    assert filed["payload"] == '{"big": true}'
    later = json.loads(ok(server, "enqueue", "report", "--payload", "x", "--in", "10m", "--json"))
    assert later["state"] == "scheduled"
    at = json.loads(
        ok(
            server,
            "enqueue",
            "report",
            "--at",
            "2099-01-01T00:00:00Z",
            "--max-retries",
            "5",
            "--json",
        )
    )
    assert at["available_at"] == "2099-01-01T00:00:00Z" and at["max_retries"] == 5

    table = ok(server, "enqueue", "mail", "--payload", "plain")
    header, row = table.splitlines()
    assert header.split() == ["id", "name", "state", "attempts", "when", "payload"]
    assert row.split()[1:4] == ["mail", "available", "0"] and row.endswith("plain")

    listed = json.loads(ok(server, "jobs", "--state", "available", "--json"))
    assert [j["payload"] for j in listed] == ["to ada", "from stdin", '{"big": true}', "plain"]
    assert [j["id"] for j in json.loads(ok(server, "jobs", "--state", "scheduled", "--json"))] == [
        later["id"],
        at["id"],
    ]
    assert len(json.loads(ok(server, "jobs", "--name", "report", "--json"))) == 2
    assert len(json.loads(ok(server, "jobs", "--limit", "1", "--json"))) == 1
    lines = ok(server, "jobs", "--name", "mail").splitlines()
    assert len(lines) == 5 and lines[0].startswith("id")

    doomed = json.loads(ok(server, "enqueue", "doomed", "--max-retries", "0", "--json"))
    body = {"worker_id": "w", "names": ["doomed"], "max_jobs": 1}
    (lease,) = httpx.post(f"{server.url}/leases", json=body).json()["leases"]
    httpx.post(f"{server.url}/leases/{lease['id']}/fail", json={"exception": "SMTP 550"})
    failed = json.loads(ok(server, "jobs", "--state", "failed", "--json"))
    assert [(j["id"], j["exception"]) for j in failed] == [(doomed["id"], "SMTP 550")]
    back = json.loads(ok(server, "retry", doomed["id"], "--json"))
    assert back["id"] == doomed["id"] and back["state"] == "available" and back["attempts"] == 0
    assert ok(server, "jobs", "--state", "failed", "--json").strip() == "[]"

    assert ok(server, "cancel", later["id"]).strip() == f"deleted {later['id']}"
    assert json.loads(ok(server, "cancel", at["id"], "--json")) == {
        "id": at["id"],
        "state": "deleted",
    }
    missing = bgjobs(server, "cancel", later["id"])
    assert missing.returncode == 1
    assert (
        missing.stderr.startswith("bgjobs: 404: ") and len(missing.stderr.strip().splitlines()) == 1
    )


def test_queue_command_shows_and_changes_settings(server: ServerProcess) -> None:
    ok(server, "enqueue", "mail", "--payload", "x")
    settings = ["--pause", "--concurrency-limit", "5", "--rate-limit", "10/1s", "--json"]
    changed = json.loads(ok(server, "queue", "mail", *settings))
    assert (changed["paused"], changed["concurrency_limit"], changed["rate_limit"]) == (
        True,
        5,
        {"count": 10, "per_ms": 1000},
    )
    assert json.loads(ok(server, "queue", "mail", "--json"))["concurrency_limit"] == 5
    cleared = json.loads(ok(server, "queue", "mail", "--resume", "--rate-limit", "none", "--json"))
    assert (cleared["paused"], cleared["concurrency_limit"], cleared["rate_limit"]) == (
        False,
        5,
        None,
    )
    lines = ok(server, "queue").splitlines()
    assert lines[0].split() == ["name", "paused", "concurrency", "rate", "available", "reserved"]
    assert lines[1].split() == ["mail", "no", "5", "-", "1", "0"]
    refused = bgjobs(server, "queue", "mail", "--concurrency-limit", "0")
    assert refused.returncode == 1 and "concurrency_limit" in refused.stderr
    bad = bgjobs(server, "queue", "mail", "--rate-limit", "ten")
    assert bad.returncode != 0 and "rate like 10/1s" in bad.stderr


def test_errors_are_one_line_with_status_1(tmp_path: Path) -> None:
    env = {**os.environ, "BGJOBS_URL": "http://127.0.0.1:9"}
    result = subprocess.run(
        [BGJOBS, "jobs"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("bgjobs: ")
    bad = subprocess.run(
        [BGJOBS, "enqueue", "n", "--in", "soon"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "is not a duration like 500ms" in bad.stderr


def test_a_token_is_sent(server_process: Any) -> None:
    with server_process(env={"BGJOBS_API_TOKENS": "p1=enqueue,r1=read"}) as server:
        refused = bgjobs(server, "enqueue", "n", "--payload", "x", "--token", "r1")
        assert refused.returncode == 1 and "lacks the 'enqueue' scope" in refused.stderr
        env_token = {**os.environ, "BGJOBS_URL": server.url, "BGJOBS_TOKEN": "p1"}
        made = subprocess.run(
            [BGJOBS, "enqueue", "n", "--payload", "x", "--json"],
            capture_output=True, text=True, env=env_token, timeout=60, check=False,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        assert json.loads(ok(server, "jobs", "--token", "r1", "--json"))[0]["payload"] == "x"


def test_stats_shows_counts_by_name(server: ServerProcess) -> None:
    for name, n in (("mail", 3), ("report", 1)):
        for i in range(n):
            ok(server, "enqueue", name, "--payload", str(i))
    ok(server, "enqueue", "report", "--payload", "later", "--in", "1h")
    body = {"worker_id": "w", "names": ["mail"], "max_jobs": 1}
    (lease,) = httpx.post(f"{server.url}/leases", json=body).json()["leases"]
    httpx.post(f"{server.url}/leases/{lease['id']}/ack")
    stats = json.loads(ok(server, "stats", "--json"))
    by_name = {entry["name"]: entry for entry in stats["names"]}
    assert by_name["mail"]["counts"] == {
        "available": 2, "scheduled": 0, "reserved": 0, "succeeded": 1, "failed": 0
    }  # fmt: skip
    assert by_name["report"]["counts"]["scheduled"] == 1
    assert stats["totals"]["counts"]["available"] == 3
    assert stats["totals"]["last_minute"]["succeeded"] == 1
    header, mail, report, total = ok(server, "stats").splitlines()
    assert header.split()[:6] == [
        "name",
        "available",
        "scheduled",
        "reserved",
        "succeeded",
        "failed",
    ]
    assert mail.split()[:6] == ["mail", "2", "0", "0", "1", "0"]
    assert report.split()[:6] == ["report", "1", "1", "0", "0", "0"]
    assert total.split()[:6] == ["(total)", "3", "1", "0", "1", "0"]
