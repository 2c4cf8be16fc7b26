"""Bearer API tokens with scopes.

Tokens come from BGJOBS_API_TOKENS (`token=scope+scope,...`) and/or a file named by
BGJOBS_API_TOKENS_FILE (the same entries, by commas or lines). With none configured the
server is open, and `bgjobs serve` then listens on loopback only.
"""

import hmac
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from app.api.errors import responses
from app.queue.errors import Forbidden, Unauthenticated

SCOPES = ("enqueue", "work", "read", "admin", "metrics")
Tokens = dict[str, frozenset[str]]

bearer = HTTPBearer(
    auto_error=False,
    description="An API token from BGJOBS_API_TOKENS. Scopes: `enqueue` (POST /jobs), "
    "`work` (/leases), `read` (GET, /stats), `admin` (cancel, delete, retry), `metrics` "
    "(GET /metrics only: counts and timings, never a payload).",
)


def parse_tokens(spec: str, file: Path | None = None) -> Tokens:
    """`p1=enqueue,w1=work,a1=read+admin` (and the file's entries) as token -> scopes."""
    text = spec + "\n" + (file.read_text() if file is not None else "")
    tokens: Tokens = {}
    for entry in text.replace("\n", ",").split(","):
        entry = entry.strip()
        if not entry:
            continue
        token, _, scopes = entry.partition("=")
        token, wanted = token.strip(), {s.strip() for s in scopes.split("+") if s.strip()}
        if not token or not wanted:
            raise ValueError("an API token entry must look like token=scope+scope")
        unknown = wanted - set(SCOPES)
        if unknown:
            raise ValueError(f"unknown API token scope(s) {sorted(unknown)}; use {SCOPES}")
        tokens[token] = frozenset(wanted)
    return tokens


def scopes_of(tokens: Tokens, presented: str) -> frozenset[str] | None:
    """Compare against every token in constant time, so timing tells nothing."""
    found: frozenset[str] | None = None
    for token, scopes in tokens.items():
        if hmac.compare_digest(token.encode(), presented.encode()):
            found = scopes
    return found


def caller_scopes(request: Request) -> frozenset[str]:
    """The scopes of the caller's bearer token; every scope on an open server."""
    tokens: Tokens = request.app.state.tokens
    if not tokens:
        return frozenset(SCOPES)
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("missing API token: send Authorization: Bearer <token>")
    scopes = scopes_of(tokens, token)
    if scopes is None:
        raise Unauthenticated("invalid API token")
    return scopes


def authorize(request: Request, scope: str) -> None:
    """The caller's bearer token must carry `scope` (when tokens are configured)."""
    if not request.app.state.tokens:
        return
    if scope not in caller_scopes(request):
        raise Forbidden(f"this API token lacks the '{scope}' scope")


def require(scope: str) -> Any:
    """A route dependency: `authorize` for `scope`, declared so the spec shows the scheme."""

    async def check(
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        authorize(request, scope)

    return Depends(check)


class MeOut(BaseModel):
    scopes: list[str] = Field(
        description="What this token may do; every scope when the server has no tokens.",
        examples=[["read", "admin"]],
    )
    open: bool = Field(description="True when the server runs without API tokens.")


router = APIRouter(tags=["auth"])


@router.get(
    "/auth/me",
    operation_id="get_auth_me",
    summary="What the caller's token may do",
    response_description="The token's scopes, so a dashboard shows only what it may do.",
    responses={401: responses()[401]},
    dependencies=[Depends(bearer)],
)
async def me(request: Request) -> MeOut:
    """Any valid token may ask; a missing or unknown token is a 401."""
    return MeOut(scopes=sorted(caller_scopes(request)), open=not request.app.state.tokens)
