"""The README is true: its walk-through runs as written and CI runs its test command."""

import re
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(section: str, language: str = "bash") -> list[str]:
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, re.DOTALL)


def test_walk_through_runs_as_written(server_process: Any) -> None:
    (script,) = code_blocks("Walk-through")
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
    out = result.stdout
    assert out.count('"state":"available"') == 4  # the two enqueues, the batch of two
    assert out.count('"status":200') == 2  # the batch ack, one result per lease
    assert '"state":"succeeded"' in out  # the ack, and the succeeded list
    assert '"outcome":"failed"' in out
    assert out.count("SMTP server said 550: no such user") == 2  # the fail, the failed list


def test_ci_runs_the_readme_test_command() -> None:
    run, test = code_blocks("Set up")
    assert "bgjobs serve" in run
    assert "pytest" in test
    assert test.strip() in (ROOT / ".ci" / "run").read_text()


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
