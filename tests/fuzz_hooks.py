"""Schemathesis hooks for tests/test_fuzz.py."""

import uuid
from typing import Any

import schemathesis


@schemathesis.hook
def map_body(context: Any, body: Any) -> Any:
    """Keep generated long polls short: a valid `wait_ms` of up to a minute is legal, but
    thousands of them would make the run last hours. Invalid values are left alone."""
    if isinstance(body, dict):
        wait = body.get("wait_ms")
        if isinstance(wait, int) and not isinstance(wait, bool) and 50 < wait <= 60_000:
            body["wait_ms"] = wait % 50
    return body


@schemathesis.hook
def map_headers(context: Any, headers: Any) -> Any:
    """Give every generated request its own Idempotency-Key: reusing one key for another
    body is refused by design (422), which is not what a fuzzer means to test."""
    if isinstance(headers, dict):
        key = headers.get("Idempotency-Key")
        if isinstance(key, str) and 0 < len(key) <= 200 and key.isascii() and key.isprintable():
            if " " not in key:
                headers["Idempotency-Key"] = f"{key}-{uuid.uuid4().hex}"
    return headers
