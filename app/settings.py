"""Every setting in one place, read from `BGJOBS_*` environment variables."""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./bgjobs.db"


def normalize_database_url(url: str) -> str:
    """Accept the plain SQLAlchemy forms users know and pick our async driver for them."""
    for plain, driver in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


class Settings(BaseSettings):
    """Server configuration; each field is `BGJOBS_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="BGJOBS_", extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_payload_bytes: int = Field(default=1024 * 1024, ge=1)
    # Room for a payload at its limit after JSON escaping, and the other fields.
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_waiting_polls: int = Field(default=1000, ge=1)
    max_event_streams: int = Field(default=100, ge=1, le=10_000)  # GET /events at once
    # POST /leases stops adding leases before their payloads pass this (at least one goes).
    max_response_bytes: int = Field(default=8 * 1024 * 1024, ge=1)
    # Longer than common client pools keep idle connections (httpx 5 s, aiohttp 15 s,
    # browsers up to 60 s), so the client, not the server, closes an idle one: a request
    # sent just as the server closes it would fail on the client.
    keep_alive_s: int = Field(default=75, ge=1, le=3600)
    access_log: bool = True
    retry_base_ms: int = Field(default=1000, ge=0)
    retry_max_ms: int = Field(default=3_600_000, ge=0)
    reaper_interval_ms: int = Field(default=250, ge=10, le=1000)
    # How often each replica looks for schedules that have come due (a read when none has).
    scheduler_interval_ms: int = Field(default=500, ge=10, le=60_000)
    # Per job name with long polls waiting, how often the database is re-read (jittered
    # ±25 %): a safety net for lost news, not how waiters learn of jobs.
    poll_recheck_ms: int = Field(default=5000, ge=10)
    retain_succeeded_hours: int = Field(default=7 * 24, ge=0)
    retain_failed_hours: int = Field(default=30 * 24, ge=0)
    idempotency_window_hours: int = Field(default=24, ge=1)
    prune_interval_s: float = Field(default=60, gt=0)
    api_tokens: str = Field(default="", repr=False)  # never shown in logs or reprs
    api_tokens_file: Path | None = None
    # Host names an open server (no tokens) also answers for, comma-separated, besides its
    # own address and the loopback names: any other Host is refused (DNS rebinding).
    allowed_hosts: str = ""
    auto_migrate: bool = True
    shutdown_grace_s: int = Field(default=10, ge=1, le=600)
    db_pool_size: int = Field(default=10, ge=1, le=500)
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "FULL"
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # `json`: one JSON object per line, for log shippers; `text` for people.
    log_format: Literal["text", "json"] = "text"
    # Any enqueue token can mint job names: past this many distinct names, metrics label
    # the rest `_other`, so a scraper's series stay bounded.
    metrics_max_names: int = Field(default=100, ge=1, le=10_000)

    @field_validator("database_url")
    @classmethod
    def _normalize(cls, url: str) -> str:
        return normalize_database_url(url)


def server_info(settings: Settings) -> dict[str, str]:
    """This server's version and database backend, for dashboards (`GET /stats`)."""
    try:
        installed = version("bgjobs-server")
    except PackageNotFoundError:  # run from a source tree that was never installed
        installed = "unknown"
    backend = "sqlite" if settings.database_url.startswith("sqlite") else "postgresql"
    return {"version": installed, "backend": backend}
