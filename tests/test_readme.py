"""The README is true: its walk-through runs as written and CI runs its test command."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(section: str, language: str = "bash") -> list[str]:
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, re.DOTALL)


def run_against_a_server(script: str, server_process: Any) -> str:
    """Run a README block written for http://127.0.0.1:8000 against a fresh server; its
    output (it must exit 0)."""
    assert script.startswith("URL=http://127.0.0.1:8000\n")
    with server_process() as server:
        script = script.replace("URL=http://127.0.0.1:8000", f"URL={server.url}", 1)
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_walk_through_runs_as_written(server_process: Any) -> None:
    (script,) = code_blocks("Walk-through")
    out = run_against_a_server(script, server_process)
    assert out.count('"state":"available"') == 4  # the two enqueues, the batch of two
    assert out.count('"status":200') == 2  # the batch ack, one result per lease
    assert '"state":"succeeded"' in out  # the ack, and the succeeded list
    assert '"outcome":"failed"' in out
    assert out.count("SMTP server said 550: no such user") == 2  # the fail, the failed list
    assert '"concurrency_limit":5,"rate_limit":{"count":10,"per_ms":1000}' in out  # the PATCH


def test_recurring_schedules_example_runs_as_written(server_process: Any) -> None:
    (script,) = code_blocks("Recurring schedules")
    out = run_against_a_server(script, server_process)
    assert out.count('"id":"nightly-report"') == 2  # its PUT, and in the list
    assert '"schedule_id":"heartbeat"' in out and '"catch_up":false' in out
    assert '"timezone":"Europe/Berlin"' in out


def test_ci_runs_the_readme_test_command() -> None:
    run, test = code_blocks("Set up")
    assert "bgjobs serve" in run
    assert "pytest" in test
    assert test.strip() in (ROOT / ".ci" / "run").read_text()


def read_until(process: subprocess.Popen[str], wanted: str, seen: list[str]) -> None:
    """Read the process's stdout lines until one contains `wanted`."""
    assert process.stdout is not None
    for line in process.stdout:
        seen.append(line)
        if wanted in line:
            return
    raise AssertionError(f"{wanted!r} never came; output: {''.join(seen)}")


def test_the_sdk_quick_start_runs_as_written(server_process: Any, tmp_path: Path) -> None:
    (script,) = code_blocks("Workers and the Python SDK", "python")
    assert 'Client("http://127.0.0.1:8000"' in script
    with server_process() as server:
        path = tmp_path / "quickstart.py"
        path.write_text(script.replace("http://127.0.0.1:8000", server.url, 1))
        process = subprocess.Popen(
            [sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        seen: list[str] = []
        try:
            read_until(process, 'sending {"to": "ada@example.com"} attempt 1', seen)
            job_id = seen[0].split()[1]
            deadline = time.monotonic() + 30
            while httpx.get(f"{server.url}/jobs/{job_id}").json()["state"] != "succeeded":
                assert time.monotonic() < deadline, "the quick start's job did not succeed"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=30)
        finally:
            process.kill()
    assert seen[0].startswith("enqueued ") and seen[0].strip().endswith(" available")
    assert process.returncode == 0, err


def test_the_bgjobs_work_example_runs_as_written(server_process: Any, tmp_path: Path) -> None:
    (script,) = code_blocks("Workers and the Python SDK", "bash")
    first = "export BGJOBS_URL=http://127.0.0.1:8000\n"
    assert script.startswith(first)
    with server_process() as server:
        script = script.replace(first, f"export BGJOBS_URL={server.url}\n", 1)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        process = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path, env=env, text=True, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        seen: list[str] = []
        try:
            read_until(process, "resizing photos/1.jpg (job ", seen)
            (job,) = httpx.get(f"{server.url}/jobs/succeeded").json()["items"] or [None]
            deadline = time.monotonic() + 30
            while job is None:
                assert time.monotonic() < deadline, "the example's job did not succeed"
                time.sleep(0.05)
                (job,) = httpx.get(f"{server.url}/jobs/succeeded").json()["items"] or [None]
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.communicate(timeout=30)
    assert job["payload"] == "photos/1.jpg"
    assert any(f"(job {job['id']})" in line for line in seen)


def test_clients_section_shows_what_ci_runs() -> None:
    """The example scripts verbatim, and the same install commands as `.ci/run`."""
    examples = ROOT / "clients" / "examples"
    assert code_blocks("Clients", "python") == [(examples / "python" / "main.py").read_text()]
    typescript = (examples / "typescript" / "main.ts").read_text()
    assert code_blocks("Clients", "typescript") == [typescript]
    (commands,) = code_blocks("Clients")
    ci = (ROOT / ".ci" / "run").read_text()
    for install in (
        ".venv-clients/bin/pip install -q -r clients/examples/python/requirements.txt",
        "npm ci --prefix clients/examples/typescript",
    ):
        assert install in commands and install in ci, install
