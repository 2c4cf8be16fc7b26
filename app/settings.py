"""Every setting in one place, read from `BGJOBS_*` environment variables."""

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
    retry_base_ms: int = Field(default=1000, ge=0)
    retry_max_ms: int = Field(default=3_600_000, ge=0)
    reaper_interval_ms: int = Field(default=250, ge=10, le=1000)
    poll_recheck_ms: int = Field(default=1000, ge=10)
    retain_succeeded_hours: int = Field(default=7 * 24, ge=0)
    retain_failed_hours: int = Field(default=30 * 24, ge=0)
    idempotency_window_hours: int = Field(default=24, ge=1)
    prune_interval_s: float = Field(default=60, gt=0)
    api_tokens: str = Field(default="", repr=False)  # never shown in logs or reprs
    api_tokens_file: Path | None = None
    auto_migrate: bool = True
    shutdown_grace_s: int = Field(default=10, ge=1, le=600)
    db_pool_size: int = Field(default=10, ge=1, le=500)
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "NORMAL"
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("database_url")
    @classmethod
    def _normalize(cls, url: str) -> str:
        return normalize_database_url(url)
