"""Alembic migrations: from an empty database and from every earlier revision, on every
backend, and the models never drift from what the migrations build."""

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from app.main import create_app
from app.settings import Settings
from app.storage import migrate, open_storage
from tests.conftest import fresh_database


@pytest.fixture
def empty_db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    yield from fresh_database(backend, tmp_path, request, migrated=False)


async def on_connection(url: str, work: Any) -> Any:
    storage = open_storage(url)
    engine: AsyncEngine = storage.engine  # type: ignore[attr-defined]
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(work)
    finally:
        await storage.close()


def revisions() -> list[str]:
    script = ScriptDirectory.from_config(migrate.alembic_config())
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def test_bgjobs_migrate_builds_an_empty_database(empty_db_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "migrate", "--database-url", empty_db_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"revision {migrate.head_revision()}" in result.stdout


async def test_models_and_migrations_agree(empty_db_url: str) -> None:
    await on_connection(empty_db_url, migrate.upgrade)
    assert await on_connection(empty_db_url, migrate.current_revision) == migrate.head_revision()
    assert await on_connection(empty_db_url, migrate.drift) == []


@pytest.mark.parametrize("start", ["base", *revisions()])
async def test_upgrade_from_every_earlier_revision(empty_db_url: str, start: str) -> None:
    if start != "base":
        await on_connection(empty_db_url, lambda conn: migrate.upgrade(conn, start))
    await on_connection(empty_db_url, migrate.upgrade)
    assert await on_connection(empty_db_url, migrate.current_revision) == migrate.head_revision()
    assert await on_connection(empty_db_url, migrate.drift) == []


async def test_downgrade_to_base_and_back(empty_db_url: str) -> None:
    from alembic import command

    def down(conn: Any) -> None:
        command.downgrade(migrate.alembic_config(conn), "base")

    await on_connection(empty_db_url, migrate.upgrade)
    await on_connection(empty_db_url, down)
    assert await on_connection(empty_db_url, migrate.current_revision) is None
    await on_connection(empty_db_url, migrate.upgrade)
    assert await on_connection(empty_db_url, migrate.drift) == []


async def test_start_up_refuses_an_unmigrated_database_when_auto_migrate_is_off(
    empty_db_url: str,
) -> None:
    app = create_app(Settings(database_url=empty_db_url, auto_migrate=False))
    with pytest.raises(RuntimeError, match="bgjobs migrate"):
        async with app.router.lifespan_context(app):
            pass


async def test_start_up_migrates_by_default(empty_db_url: str) -> None:
    app = create_app(Settings(database_url=empty_db_url))
    async with app.router.lifespan_context(app):
        pass
    assert await on_connection(empty_db_url, migrate.current_revision) == migrate.head_revision()


async def test_drift_check_notices_a_difference(empty_db_url: str) -> None:
    """The guard above can fail: a schema missing one index is reported."""
    from sqlalchemy import text

    await on_connection(empty_db_url, migrate.upgrade)

    def drop_index(conn: Any) -> None:
        conn.execute(text("DROP INDEX ix_jobs_available_at"))

    await on_connection(empty_db_url, drop_index)
    diffs = await on_connection(empty_db_url, migrate.drift)
    assert any("ix_jobs_available_at" in str(diff) for diff in diffs), diffs
