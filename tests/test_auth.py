"""Only the right clients get in: bearer tokens with scopes, and no open server exposed."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.api.auth import parse_tokens
from app.cli import exposure_refusal
from app.main import create_app
from app.settings import Settings
from tests.conftest import enqueue, free_port

TOKENS = "p1=enqueue,w1=work,r1=read,a1=read+admin"


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(database_url=db_url, api_tokens=TOKENS)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


REQUESTS = [  # (scope needed, method, path, body)
    ("enqueue", "POST", "/jobs", {"name": "a", "payload": "p"}),
    ("work", "POST", "/leases", {"worker_id": "w", "names": ["a"]}),
    ("work", "POST", "/leases/x.1/ack", None),
    ("work", "DELETE", "/leases/x.1", None),
    ("read", "GET", "/jobs", None),
    ("read", "GET", "/jobs/succeeded", None),
    ("read", "GET", "/jobs/x", None),
    ("admin", "DELETE", "/jobs/x", None),
    ("admin", "POST", "/jobs/x/retry", None),
    ("admin", "POST", "/jobs/retry", {"ids": ["x"]}),
    ("admin", "POST", "/jobs/delete", {"filter": {"state": "failed"}}),
    ("admin", "PUT", "/schedules/x", {"name": "a", "payload": "p", "interval_ms": 60000}),
    ("admin", "DELETE", "/schedules/x", None),
    ("read", "GET", "/schedules", None),
    ("read", "GET", "/schedules/x", None),
]


@pytest.mark.parametrize(("scope", "method", "path", "body"), REQUESTS)
async def test_each_operation_needs_its_scope(
    client: httpx.AsyncClient, scope: str, method: str, path: str, body: Any
) -> None:
    missing = await client.request(method, path, json=body)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "missing API token" in missing.json()["detail"]
    wrong = await client.request(method, path, json=body, headers=auth("p1x"))
    assert wrong.status_code == 401 and wrong.json()["detail"] == "invalid API token"
    basic = await client.request(method, path, json=body, headers={"Authorization": "Basic cDE="})
    assert basic.status_code == 401
    for token, scopes in parse_tokens(TOKENS).items():
        response = await client.request(method, path, json=body, headers=auth(token))
        if scope in scopes:
            assert response.status_code not in (401, 403), (token, response.text)
        else:
            assert response.status_code == 403, (token, response.text)
            assert f"lacks the '{scope}' scope" in response.json()["detail"]


async def test_a_whole_round_with_scoped_tokens(client: httpx.AsyncClient) -> None:
    client.headers.update(auth("p1"))
    job = await enqueue(client)
    lease = (
        await client.post(
            "/leases", json={"worker_id": "w", "names": ["send_email"]}, headers=auth("w1")
        )
    ).json()["leases"][0]
    assert (await client.post(f"/leases/{lease['id']}/ack", headers=auth("w1"))).status_code == 200
    got = await client.get(f"/jobs/{job['id']}", headers=auth("r1"))
    assert got.json()["state"] == "succeeded"
    assert (await client.delete(f"/jobs/{job['id']}", headers=auth("a1"))).status_code == 204


async def test_probes_and_spec_stay_open(client: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert (await client.get(path)).status_code == 200, path


async def test_tokens_from_a_file(db_url: str, tmp_path: Path) -> None:
    secrets = tmp_path / "tokens"
    secrets.write_text("f1=read\nf2=enqueue+work\n")
    app = create_app(Settings(database_url=db_url, api_tokens_file=secrets))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            assert (await client.get("/jobs", headers=auth("f1"))).status_code == 200
            assert (await client.get("/jobs", headers=auth("f2"))).status_code == 403
            assert (await client.get("/jobs")).status_code == 401


@pytest.mark.parametrize("spec", ["p1", "p1=", "p1=root", "=read"])
def test_bad_token_configuration_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="token"):
        parse_tokens(spec)


def test_an_open_server_stays_on_loopback() -> None:
    open_settings = Settings(host="0.0.0.0")
    refusal = exposure_refusal(open_settings, insecure=False)
    assert refusal and "BGJOBS_API_TOKENS" in refusal and "--insecure" in refusal
    assert exposure_refusal(open_settings, insecure=True) is None
    assert exposure_refusal(Settings(host="0.0.0.0", api_tokens="t=read"), False) is None
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert exposure_refusal(Settings(host=host), insecure=False) is None
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2 and "refusing to listen on 0.0.0.0" in result.stderr


def test_insecure_exposure_says_so(tmp_path: Path) -> None:
    port = str(free_port())
    db = f"sqlite:///{tmp_path / 'open.db'}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.cli",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            port,
            "--database-url",
            db,
            "--insecure",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        first = process.stderr.readline()
        assert "WARNING: open server on 0.0.0.0 (--insecure)" in first
    finally:
        process.kill()
        process.wait()


def test_tokens_never_reach_the_logs(server_process: Any) -> None:
    secret = "s3cr3t-token-value"
    env = {"BGJOBS_API_TOKENS": f"{secret}=enqueue+read", "BGJOBS_LOG_LEVEL": "debug"}
    with server_process(env=env) as server:
        headers = auth(secret)
        assert (
            httpx.post(
                f"{server.url}/jobs", json={"name": "a", "payload": "p"}, headers=headers
            ).status_code
            == 201
        )
        assert httpx.get(f"{server.url}/jobs", headers=auth(secret + "x")).status_code == 401
        output = server.output()
    assert "POST /jobs" in output  # the log is there...
    assert secret not in output  # ...and the token is not


async def test_auth_me_tells_a_token_its_scopes(client: httpx.AsyncClient) -> None:
    for token, scopes in parse_tokens(TOKENS).items():
        response = await client.get("/auth/me", headers=auth(token))
        assert response.status_code == 200, response.text
        assert response.json() == {"scopes": sorted(scopes), "open": False}
    assert (await client.get("/auth/me")).status_code == 401
    assert (await client.get("/auth/me", headers=auth("nope"))).status_code == 401


async def test_auth_me_on_an_open_server(db_url: str) -> None:
    app = create_app(Settings(database_url=db_url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            answer = (await client.get("/auth/me")).json()
    assert answer == {"scopes": ["admin", "enqueue", "metrics", "read", "work"], "open": True}
