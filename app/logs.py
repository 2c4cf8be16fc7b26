"""Log lines as text for people or as JSON for log shippers (`BGJOBS_LOG_FORMAT`).

Only what the code passes in `extra` (request ids, routes, statuses, job ids and names)
becomes a field: never a header, a token or a payload.
"""

import json
import logging
import logging.config
from datetime import UTC, datetime
from typing import Any

from app.settings import Settings

FIELDS = (
    "request_id", "method", "route", "status", "duration_ms", "event", "job_id", "job_name",
)  # fmt: skip
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the known fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def logging_config(settings: Settings) -> dict[str, Any]:
    """A dictConfig for our loggers and uvicorn's, in the chosen format (uvicorn's own
    access log is off: the app writes one line per request itself)."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if settings.log_format == "json" else {"format": TEXT_FORMAT}
    )
    handler = {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}
    level = settings.log_level.upper()
    logger = {"handlers": ["main"], "level": level, "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {"main": handler},
        "loggers": {"bgjobs": logger, "uvicorn": logger, "uvicorn.error": {"level": level}},
    }


def ensure_logging(settings: Settings) -> None:
    """Under a bare ASGI server (`uvicorn app.main:app`) nobody has configured our
    loggers: do it, once, so request and lifecycle lines are not lost."""
    if not logging.getLogger("bgjobs").handlers:
        config = logging_config(settings)
        # Propagate: whatever the host has set up on the root logger sees them too.
        config["loggers"] = {"bgjobs": {**config["loggers"]["bgjobs"], "propagate": True}}
        logging.config.dictConfig(config)
