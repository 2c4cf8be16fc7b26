"""The `bgjobs` command as users run it: a real process, a real file, restarts."""

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx


def test_data_survives_a_restart_and_a_kill(server_process: Any, db_url: str) -> None:
    url = db_url.replace("+aiosqlite", "")  # the plain sqlite:/// form is accepted too
    with server_process(database_url=url) as server:
        pending = httpx.post(f"{server.url}/jobs", json={"name": "a", "payload": "1"}).json()
        done = httpx.post(f"{server.url}/jobs", json={"name": "b", "payload": "2"}).json()
        lease = httpx.post(f"{server.url}/leases", json={"worker_id": "w", "names": ["b"]}).json()[
            "leases"
        ][0]
        assert httpx.post(f"{server.url}/leases/{lease['id']}/ack").status_code == 200
        held = httpx.post(f"{server.url}/jobs", json={"name": "c", "payload": "3"}).json()
        held_lease = httpx.post(
            f"{server.url}/leases", json={"worker_id": "w", "names": ["c"]}
        ).json()["leases"][0]
        server.stop(signal.SIGKILL)  # no chance to flush anything
    with server_process(database_url=url) as server:
        assert httpx.get(f"{server.url}/jobs/{pending['id']}").json()["state"] == "available"
        assert httpx.get(f"{server.url}/jobs/{done['id']}").json()["state"] == "succeeded"
        assert httpx.get(f"{server.url}/jobs/{held['id']}").json()["state"] == "reserved"
        ack = httpx.post(f"{server.url}/leases/{held_lease['id']}/ack")
        assert ack.status_code == 200, ack.text


def test_sqlite_file_is_created_in_wal_mode(server_process: Any, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "jobs.db"
    with server_process(database_url=f"sqlite+aiosqlite:///{path}") as server:
        assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{server.url}/readyz").json() == {"status": "ready"}
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"jobs", "succeeded_jobs", "failed_jobs", "ix_jobs_ready"} <= tables


def test_env_settings_are_read(server_process: Any, tmp_path: Path) -> None:
    env = {"BGJOBS_MAX_PAYLOAD_BYTES": "10"}
    with server_process(env=env) as server:
        response = httpx.post(f"{server.url}/jobs", json={"name": "a", "payload": "x" * 11})
        assert response.status_code == 413


def test_console_command_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in ("--host", "--port", "--database-url"):
        assert flag in result.stdout


def test_unsupported_database_url_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", "0", "--database-url", "mysql://nope"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "unsupported database URL" in result.stderr
