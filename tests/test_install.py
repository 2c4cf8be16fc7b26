"""The two installs a user makes, each in a fresh virtualenv: the client alone on a worker
machine (httpx only, no server stack), and the server with the client (README's set-up)."""

import os
import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER_ONLY = ("fastapi", "sqlalchemy", "uvicorn", "sqlmodel", "asyncpg", "alembic")


def fresh_venv(path: Path) -> Path:
    venv.create(path, with_pip=True)
    return path / "bin"


def pip_install(bin_dir: Path, *targets: str) -> None:
    result = subprocess.run(
        [str(bin_dir / "pip"), "install", "-q", "--disable-pip-version-check", *targets],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def run(bin_dir: Path, *command: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        command, cwd="/", capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_the_client_installs_alone(tmp_path: Path) -> None:
    bin_dir = fresh_venv(tmp_path / "client")
    pip_install(bin_dir, "./clients/python")
    probe = "import importlib.util as u, bgjobs_client; print([m for m in %r if u.find_spec(m)])"
    result = run(bin_dir, str(bin_dir / "python"), "-c", probe % (SERVER_ONLY,))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"  # none of the server's stack came with it
    help_text = run(bin_dir, "bgjobs", "--help").stdout
    for command in ("work", "enqueue", "jobs", "retry", "cancel", "stats"):
        assert command in help_text
    assert "serve" not in help_text and "migrate" not in help_text


def test_the_server_install_adds_its_commands(tmp_path: Path) -> None:
    bin_dir = fresh_venv(tmp_path / "server")
    pip_install(bin_dir, "./clients/python", ".")
    help_text = run(bin_dir, "bgjobs", "--help")
    assert help_text.returncode == 0, help_text.stderr
    for command in ("serve", "migrate", "work", "enqueue", "stats"):
        assert command in help_text.stdout
    database = f"sqlite:///{tmp_path / 'fresh.db'}"
    migrated = run(bin_dir, "bgjobs", "migrate", "--database-url", database)
    assert migrated.returncode == 0 and "database schema is at revision" in migrated.stdout
    imported = run(bin_dir, str(bin_dir / "python"), "-c", "import bgjobs_client, app.main")
    assert imported.returncode == 0, imported.stderr
    dashboard = "from app.ui import load_assets; print(sorted(load_assets()))"
    shipped = run(bin_dir, str(bin_dir / "python"), "-c", dashboard)  # package data, not the tree
    assert shipped.stdout.strip() == "['app.css', 'app.js', 'index.html']", shipped.stderr
