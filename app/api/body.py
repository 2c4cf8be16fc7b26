"""Request bodies of the hot routes, validated straight from their bytes.

FastAPI's dependency and body machinery costs several times the work behind an enqueue
or an ack (profiled with py-spy: about two thirds of a request's CPU). The hot routes
therefore take the Request itself and validate with pydantic's JSON mode
(`model_validate_json`); `documented()` puts the body, headers and security they read
into the OpenAPI spec, and bad input gets the same 422s as on every other route.
"""

import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

# Models read by `parse`: main.py adds their schemas to the spec's components.
DOCUMENTED: list[type[BaseModel]] = []


def with_documented_bodies(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the schemas of the bodies `parse` reads to the spec's components (FastAPI only
    adds those it parses itself)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in DOCUMENTED:
        found = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in found.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components.setdefault(model.__name__, found)
    return schema


def documented(
    model: type[BaseModel], headers: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The `openapi_extra` of a route whose body `parse` reads as `model`; bearer tokens
    as on every other route."""
    DOCUMENTED.append(model)
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    extra: dict[str, Any] = {
        "requestBody": {"content": {"application/json": {"schema": schema}}, "required": True},
        "security": [{"HTTPBearer": []}],
    }
    if headers:
        extra["parameters"] = headers
    return extra


async def parse(request: Request, model: type[M]) -> M:
    """The body as `model`, or the 422 (413) FastAPI's own parsing would give."""
    body = await request.body()  # BodyTooLarge past the limit: a 413 (errors.py)
    if not body:
        raise _invalid("missing", "Field required", None)
    if not _is_json(request.headers.get("content-type")):
        raise _invalid("model_attributes_type", "Input should be a JSON object", body)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        if any(error["type"] == "json_invalid" for error in exc.errors()):
            return _parse_slowly(body, model)  # the stdlib's words for what is wrong
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        ) from None


def _parse_slowly(body: bytes, model: type[M]) -> M:
    """Malformed JSON (rare): parse as FastAPI does, so the errors read the same."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise _invalid("json_invalid", "JSON decode error", {}, error=exc.msg) from None
    except RecursionError:
        raise _invalid("json_invalid", "JSON decode error", {}, error="nested too deeply") from None
    except UnicodeDecodeError:
        error = "the body is not UTF-8 text"
        raise _invalid("json_invalid", "JSON decode error", {}, error=error) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        ) from None


def _invalid(kind: str, msg: str, given: object, **ctx: str) -> RequestValidationError:
    error: dict[str, Any] = {"type": kind, "loc": ("body",), "msg": msg, "input": given}
    if ctx:
        error["ctx"] = ctx
    return RequestValidationError([error])


def _is_json(content_type: str | None) -> bool:
    """No Content-Type, application/json or application/*+json (FastAPI's rule)."""
    if content_type is None:
        return True
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )
