"""The one place where domain errors and bad input become HTTP statuses."""

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.api import render
from app.api.guard import BodyTooLarge
from app.api.schemas import ConflictOut, ErrorOut, ValidationErrorOut
from app.queue.errors import (
    Conflict,
    Forbidden,
    IdempotencyKeyReused,
    InvalidCursor,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    QueueError,
    StorageUnavailable,
    Unauthenticated,
)

STATUS: dict[type[QueueError], int] = {
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    InvalidCursor: 422,
    IdempotencyKeyReused: 422,
    StorageUnavailable: 503,
    Overloaded: 503,
}

_DESCRIPTIONS = {
    401: "No API token, or an unknown one (only when the server has tokens configured).",
    403: "The API token lacks the scope this operation needs; or, on a server without API "
    "tokens, the request came from another site (`Origin`) or names another host (`Host`).",
    404: "Unknown job or lease.",
    409: "The job's current state forbids this, or the job an Idempotency-Key names is gone "
    "(details in `detail`, the reason in `code`).",
    413: "The payload or the request body is over the configured size limit.",
    415: "The request has a body whose `Content-Type` is not JSON (`application/json`).",
    422: "Invalid input: malformed JSON, a wrong type, an out-of-range value or an unknown field.",
    503: "The database is unavailable, or too many long polls are open; retry after "
    "`Retry-After` seconds.",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer, so clients know them."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in (*statuses, 401, 403, 415, 422, 503):
        model = {422: ValidationErrorOut, 409: ConflictOut}.get(status, ErrorOut)
        out[status] = {"model": model, "description": _DESCRIPTIONS[status]}
    return out


def status_of(error: QueueError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


async def queue_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, QueueError)
    status = status_of(exc)
    headers = {"Retry-After": "1"} if status == 503 else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    body: dict[str, Any] = {"detail": exc.detail}
    if isinstance(exc, Conflict):
        body = render.refusal(exc, status)
    if status == 422:  # the same shape as every other 422
        loc, kind = list(getattr(exc, "field", ())), getattr(exc, "kind", "invalid")
        body["errors"] = [{"loc": loc, "msg": exc.detail, "type": kind}]
    return JSONResponse(body, status_code=status, headers=headers)


_PARSE_FAILURES: dict[type[BaseException], str] = {
    RecursionError: "nested too deeply",
    UnicodeDecodeError: "the body is not UTF-8 text",
}


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's errors as JSON. A body FastAPI cannot even parse (too deep, not UTF-8)
    is malformed JSON like any other: a 422, not FastAPI's bare 400."""
    assert isinstance(exc, HTTPException)
    if isinstance(exc.__cause__, BodyTooLarge):
        return JSONResponse({"detail": str(exc.__cause__)}, status_code=413)
    if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not parse the body
        reason = next(
            (text for kind, text in _PARSE_FAILURES.items() if isinstance(exc.__cause__, kind)),
            "the body cannot be parsed",
        )
        detail = f"malformed JSON: {reason}"
        errors = [{"loc": ["body"], "msg": detail, "type": "json_invalid"}]
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)
    headers = exc.headers
    if exc.status_code == 405:  # Starlette names only the first matching route's methods
        headers = {"Allow": ", ".join(allowed_methods(request))}
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (the spec's paths are the routes)."""
    path = request.scope.get("path", "")
    paths: dict[str, dict[str, Any]] = request.app.openapi()["paths"]
    if path in paths:  # a literal path wins over templates, as in routing: /jobs/failed
        return sorted(method.upper() for method in paths[path])
    methods: set[str] = set()
    for template, operations in paths.items():
        pattern = re.sub(r"\\{[^/]+\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "json_invalid":
        return f"malformed JSON: {error.get('ctx', {}).get('error', 'cannot be parsed')}"
    if kind == "missing" and tuple(error["loc"]) == ("body",):
        return "a JSON request body is required"
    if kind == "extra_forbidden":
        return f"{where}: unknown field (check its spelling against the API spec)"
    if kind == "string_pattern_mismatch":
        what = "a schedule id" if where.endswith("schedule_id") else "a job name"
        return f"{where}: {what} is 1..255 characters of A-Z a-z 0-9 _ . : -"
    if kind in ("model_attributes_type", "dict_type", "model_type"):
        if isinstance(error.get("input"), str | bytes) and where == "body":
            return "body: must be a JSON object sent with Content-Type: application/json"
        return f"{where}: must be a JSON object"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}"


async def invalid_input(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "loc": [p if isinstance(p, int) else str(p) for p in e["loc"]],
            "msg": _describe(e),
            "type": e["type"],
        }
        for e in exc.errors()
    ]
    detail = "; ".join(e["msg"] for e in errors) or "invalid request"
    return JSONResponse({"detail": detail, "errors": errors}, status_code=422)


async def body_too_large(_request: Request, exc: Exception) -> JSONResponse:
    """A body that grew past the limit while a route read it itself."""
    return JSONResponse({"detail": str(exc)}, status_code=413)


def install(app: FastAPI) -> None:
    app.add_exception_handler(BodyTooLarge, body_too_large)
    app.add_exception_handler(QueueError, queue_error)
    app.add_exception_handler(RequestValidationError, invalid_input)
    app.add_exception_handler(HTTPException, http_error)
