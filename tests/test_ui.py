"""The dashboard at /ui, in a real browser: Debian's Chromium, headless, driven by
Playwright against a live `bgjobs serve` on each backend, with data made through the API.

Waiting is Playwright's auto-retrying `expect`, never a sleep. Each test saves a screenshot
of what it looked at under its pytest tmp dir. Without /usr/bin/chromium these tests are
skipped with the reason; under CI they fail instead.
"""

import os
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Dialog, Locator, Page, Request, expect

from app.main import create_app
from app.settings import Settings
from app.ui import CSP
from tests.conftest import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
# No sandbox: CI runs as root; the rest keeps a headless Chromium from phoning home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
]
XSS = '<script>alert("xss")</script><img src=x onerror="alert(1)">'
TOKENS = "ops=enqueue+work+read+admin,viewer=read"

# The page refreshes on events or every 2 s; a busy CI machine gets some slack.
expect.set_options(timeout=20_000)


@pytest.fixture(scope="session")
def browser_type_launch_args() -> dict[str, Any]:
    """pytest-playwright-asyncio's launch options: the system's Chromium, never a
    downloaded one."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (apt-get install chromium fonts-liberation)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the dashboard tests, but {reason}")
        pytest.skip(f"dashboard tests skipped: {reason}")
    return {"executable_path": str(CHROMIUM), "headless": True, "args": CHROMIUM_ARGS}


@dataclass
class Live:
    """A running server and an API client for it."""

    server: ServerProcess
    api: httpx.AsyncClient

    @property
    def url(self) -> str:
        return self.server.url

    async def enqueue(self, name: str, payload: str = "{}", **fields: Any) -> dict[str, Any]:
        response = await self.api.post("/jobs", json={"name": name, "payload": payload, **fields})
        assert response.status_code == 201, response.text
        job: dict[str, Any] = response.json()
        return job

    async def lease(self, name: str, worker: str = "worker-1") -> dict[str, Any]:
        body = {"worker_id": worker, "names": [name], "max_jobs": 1}
        response = await self.api.post("/leases", json=body)
        assert response.status_code == 200, response.text
        (lease,) = response.json()["leases"]
        held: dict[str, Any] = lease
        return held

    async def failed(
        self, name: str, payload: str = "{}", exception: str = "boom", worker: str = "worker-1"
    ) -> str:
        """A job that ran once and failed for good; its id. One at a time per name, so the
        lease takes this very job."""
        job = await self.enqueue(name, payload, max_retries=0)
        lease = await self.lease(name, worker)
        assert lease["job"]["id"] == job["id"]
        response = await self.api.post(f"/leases/{lease['id']}/fail", json={"exception": exception})
        assert response.json()["outcome"] == "failed", response.text
        return str(job["id"])

    async def state(self, job_id: str) -> str | None:
        response = await self.api.get(f"/jobs/{job_id}")
        return None if response.status_code == 404 else str(response.json()["state"])


Start = Callable[..., AbstractContextManager[ServerProcess]]


async def live_server(
    server_process: Start, db_url: str, env: dict[str, str] | None = None, token: str = ""
) -> AsyncIterator[Live]:
    with server_process(database_url=db_url, env=env) as server:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as api:
            yield Live(server, api)


@pytest.fixture
async def live(server_process: Start, db_url: str) -> AsyncIterator[Live]:
    """An open server (no tokens), as `bgjobs serve` runs by default."""
    async for running in live_server(server_process, db_url):
        yield running


@pytest.fixture
async def guarded(server_process: Start, db_url: str) -> AsyncIterator[Live]:
    """A server with tokens; the API client holds the all-powerful one."""
    env = {"BGJOBS_API_TOKENS": TOKENS}
    async for running in live_server(server_process, db_url, env, token="ops"):
        yield running


def cell(page: Page, name: str, state: str) -> Locator:
    return page.locator(f'tr[data-name="{name}"] td[data-state="{state}"]')


def row(page: Page, job_id: str) -> Locator:
    return page.locator(f'tr[data-id="{job_id}"]')


async def shoot(page: Page, tmp_path: Path, view: str) -> Path:
    path = tmp_path / f"{view}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def test_overview_counts_change_live(
    page: Page, live: Live, backend: str, tmp_path: Path
) -> None:
    await live.enqueue("send_email")
    response = await page.goto(f"{live.url}/ui")
    assert response is not None and response.headers["content-security-policy"] == CSP
    await expect(cell(page, "send_email", "available")).to_have_text("1")
    await expect(page.locator(".server")).to_contain_text(
        "SQLite" if backend == "sqlite" else "PostgreSQL"
    )
    await page.evaluate("window.noReload = true")

    for _ in range(2):
        await live.enqueue("send_email")
    await live.enqueue("resize", available_in_ms=3_600_000)
    await live.failed("report", exception="SMTP 550")

    await expect(cell(page, "send_email", "available")).to_have_text("3")
    await expect(cell(page, "resize", "scheduled")).to_have_text("1")
    await expect(cell(page, "report", "failed")).to_have_text("1")
    await expect(page.locator('dd[data-total="available"]')).to_have_text("3")
    await expect(page.locator('dd[data-total="failed"]')).to_have_text("1")
    await expect(page.locator('tr[data-name="report"] svg.spark')).to_be_visible()
    assert await page.evaluate("window.noReload") is True  # updated in place
    await shoot(page, tmp_path, "overview")

    await page.set_viewport_size({"width": 390, "height": 844})  # a phone
    await expect(cell(page, "send_email", "available")).to_have_text("3")
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    await shoot(page, tmp_path, "overview-phone")


async def test_pause_resume_and_a_lost_server_are_caught_up(page: Page, live: Live) -> None:
    """Paused, the page stops listening; resumed, it reloads. When the server goes away and
    comes back (a new process that knows none of the old event ids), the page reconnects
    by itself and shows what happened meanwhile. With /events it listens to the stream,
    without it polls /stats."""
    streaming = "/events" in (await live.api.get("/openapi.json")).json()["paths"]
    status = page.locator("#live-status")
    await page.goto(f"{live.url}/ui")
    await expect(status).to_have_text(
        re.compile(r"^live( ·|$)" if streaming else r"^live \(polling")
    )
    toggle = page.get_by_role("button", name="Pause live updates")
    await toggle.click()
    await expect(toggle).to_have_attribute("aria-pressed", "true")
    await expect(status).to_have_text("paused")
    await live.enqueue("send_email")
    await toggle.click()
    await expect(toggle).to_have_attribute("aria-pressed", "false")
    await expect(cell(page, "send_email", "available")).to_have_text("1")

    live.server.stop()
    await expect(status).not_to_have_text(re.compile(r"^live"))  # it noticed
    live.server.start()  # the same port and database
    await live.enqueue("send_email")
    await expect(cell(page, "send_email", "available")).to_have_text("2")
    await expect(status).to_have_text(
        re.compile(r"^live( ·|$)" if streaming else r"^live \(polling")
    )


async def test_a_burst_comes_coalesced_and_a_reset_reloads(page: Page, live: Live) -> None:
    """Over 100 changes in one flush reach the page as one `coalesced` event, and its
    counts follow with no reload. Resuming from an id the server no longer knows (it was
    restarted) brings a `reset`, and the page reloads its data."""
    status = page.locator("#live-status")
    await page.goto(f"{live.url}/ui")
    await expect(status).to_have_attribute("data-seen", re.compile(r"\bstats\b"))
    await page.evaluate("window.noReload = true")
    burst = await live.api.post(
        "/jobs/batch", json={"jobs": [{"name": "burst", "payload": "x"}] * 500}
    )
    assert burst.status_code == 201, burst.text
    await expect(status).to_have_attribute("data-seen", re.compile(r"\bcoalesced\b"))
    await expect(cell(page, "burst", "available")).to_have_text("500")
    assert not re.search(r"\breset\b", await status.get_attribute("data-seen") or "")

    live.server.stop()
    live.server.start()  # a new process: the page's last event id means nothing to it
    await expect(status).to_have_attribute("data-seen", re.compile(r"\breset\b"))
    await live.enqueue("after")
    await expect(cell(page, "after", "available")).to_have_text("1")
    assert await page.evaluate("window.noReload") is True  # data reloaded, not the page


async def test_a_failed_job_found_opened_and_retried(
    page: Page, live: Live, tmp_path: Path
) -> None:
    wanted = await live.failed("charge", '{"order": "A-1234-needle"}', "CardDeclined: 51")
    for n in range(2):
        await live.failed("charge", f'{{"order": "B-{n}"}}', "CardDeclined: 05")
    await page.goto(f"{live.url}/ui#/jobs/failed")
    await expect(page.locator("tbody tr[data-id]")).to_have_count(3)

    # The payload search goes to the server (q=); a server without it lists everything.
    await page.get_by_label("Payload search", exact=True).fill("needle")
    await page.get_by_role("button", name="Search", exact=True).click()
    await expect(page).to_have_url(re.compile(r"q=needle"))
    await expect(row(page, wanted)).to_be_visible()
    searched = (await live.api.get("/jobs/failed", params={"q": "needle"})).json()["items"]
    if [job["id"] for job in searched] == [wanted]:  # q= is supported: only the match shows
        await expect(page.locator("tbody tr[data-id]")).to_have_count(1)
    await shoot(page, tmp_path, "jobs-search")

    # The id search jumps to the job.
    await page.get_by_label("Job id", exact=True).fill(wanted)
    await page.get_by_role("button", name="Open job").click()
    await expect(page.locator("pre.exception")).to_have_text("CardDeclined: 51")
    await expect(page.locator("pre.payload")).to_have_text('{\n  "order": "A-1234-needle"\n}')
    await shoot(page, tmp_path, "job-detail")

    await page.get_by_role("button", name="Retry", exact=True).click()
    await expect(page.get_by_role("status").filter(has_text="Retried")).to_be_visible()
    await expect(page.locator(".fields .state")).to_have_text("available")
    assert await live.state(wanted) == "available"
    await expect(page.get_by_role("button", name="Cancel", exact=True)).to_be_visible()


async def test_bulk_delete_selected_and_retry_all_matching(
    page: Page, live: Live, tmp_path: Path
) -> None:
    emails = [await live.failed("send_email", f"to-{n}", "SMTP 550") for n in range(3)]
    reports = [await live.failed("report", f"r-{n}", "timeout") for n in range(2)]
    await page.goto(f"{live.url}/ui#/jobs/failed")
    await expect(page.locator("tbody tr[data-id]")).to_have_count(5)

    for job_id in emails[:2]:
        await page.get_by_label(f"Select job {job_id}").check()
    await page.get_by_role("button", name="Delete selected (2)").click()
    await shoot(page, tmp_path, "bulk-confirm")
    await page.get_by_role("button", name="Confirm").click()
    await expect(page.get_by_role("status").filter(has_text="Deleted 2 of 2")).to_be_visible()
    await expect(page.locator("tbody tr[data-id]")).to_have_count(3)
    assert [await live.state(j) for j in emails] == [None, None, "failed"]

    await page.get_by_label("Name", exact=True).fill("report")
    await page.get_by_role("button", name="Search", exact=True).click()
    await expect(page.locator("tbody tr[data-id]")).to_have_count(2)
    await page.get_by_role("button", name="Retry all matching").click()
    await page.get_by_role("button", name="Confirm").click()
    await expect(page.get_by_role("status").filter(has_text="Retried 2")).to_be_visible()
    await expect(page.get_by_text("No jobs here.")).to_be_visible()
    assert [await live.state(j) for j in reports] == ["available", "available"]
    assert await live.state(emails[2]) == "failed"  # another name: untouched

    await page.goto(f"{live.url}/ui#/failures")
    await expect(page.locator("table.groups tbody tr")).to_have_count(1)
    await expect(page.locator("table.groups tbody tr")).to_contain_text("SMTP 550")
    await shoot(page, tmp_path, "failures")


async def test_enqueue_from_the_form_by_keyboard(page: Page, live: Live, tmp_path: Path) -> None:
    await page.goto(f"{live.url}/ui#/enqueue")
    await page.get_by_label("Name", exact=True).fill("resize")
    await page.keyboard.press("Tab")
    await page.keyboard.type("photos/1.jpg")
    await page.keyboard.press("Tab")
    await page.keyboard.type("60000")
    await page.keyboard.press("Tab")
    await page.keyboard.type("2")
    await page.keyboard.press("Tab")
    await page.keyboard.type("3")
    await shoot(page, tmp_path, "enqueue")
    await page.keyboard.press("Enter")

    made = page.get_by_role("status").filter(has_text="Enqueued")
    await expect(made).to_contain_text("(scheduled)")
    job_id = await made.get_by_role("link").text_content()
    job = (await live.api.get(f"/jobs/{job_id}")).json()
    assert (job["name"], job["payload"], job["state"]) == ("resize", "photos/1.jpg", "scheduled")
    assert (job["max_retries"], job["priority"]) == (2, 3)
    await made.get_by_role("link").click()
    await expect(page.locator("pre.payload")).to_have_text("photos/1.jpg")
    priority = page.locator(".field", has=page.locator("dt", has_text="Priority"))
    await expect(priority.locator("dd")).to_have_text("3")


async def test_a_token_is_asked_for_and_a_read_only_one_sees_no_actions(
    page: Page, guarded: Live, tmp_path: Path
) -> None:
    failed = await guarded.failed("send_email", "{}", "SMTP 550")
    sent: list[Request] = []

    def record(request: Request) -> None:
        sent.append(request)

    page.on("request", record)
    await page.goto(f"{guarded.url}/ui")
    token = page.get_by_label("Token", exact=True)
    await expect(token).to_be_visible()
    await shoot(page, tmp_path, "token-prompt")

    await token.fill("not-a-token")
    await page.get_by_role("button", name="Use token").click()
    await expect(page.get_by_role("alert")).to_contain_text("refused")
    await token.fill("viewer")
    await page.get_by_role("button", name="Use token").click()
    await expect(cell(page, "send_email", "failed")).to_have_text("1")
    await expect(page.locator("#who")).to_have_text("token: read")
    assert await page.evaluate("sessionStorage.getItem('bgjobs.token')") == "viewer"
    assert await page.context.cookies() == []

    await page.goto(f"{guarded.url}/ui#/job/{failed}")
    await expect(page.locator("pre.exception")).to_have_text("SMTP 550")
    actions = page.get_by_role("button", name=re.compile("Retry|Delete|Cancel"))
    await expect(actions).to_have_count(0)
    await page.goto(f"{guarded.url}/ui#/jobs/failed")
    await expect(row(page, failed)).to_be_visible()
    await expect(actions).to_have_count(0)
    await expect(page.get_by_role("checkbox")).to_have_count(0)
    await expect(page.get_by_role("link", name="Enqueue")).to_have_attribute(
        "aria-disabled", "true"
    )
    await shoot(page, tmp_path, "read-only")

    api_calls = [r for r in sent if "/ui" not in r.url]
    assert api_calls and all("viewer" not in r.url for r in sent)
    authorized = [
        (await r.all_headers()).get("authorization") for r in api_calls if "/stats" in r.url
    ]
    assert authorized and set(authorized) == {"Bearer viewer"}


async def test_payload_exception_and_worker_id_render_as_text(
    page: Page, live: Live, tmp_path: Path
) -> None:
    dialogs: list[str] = []

    async def dismiss(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", dismiss)
    failed = await live.failed("xss", XSS, XSS + "\nsecond line")
    reserved = await live.enqueue("xss", XSS)
    held = await live.lease("xss", worker=XSS)

    await page.goto(f"{live.url}/ui#/job/{failed}")
    await expect(page.locator("pre.payload")).to_have_text(XSS)
    await expect(page.locator("pre.exception")).to_have_text(XSS + "\nsecond line")
    await page.goto(f"{live.url}/ui#/job/{reserved['id']}")
    await expect(page.locator(".fields .worker")).to_have_text(XSS)
    # A reserved job shows when its lease runs out, exact in UTC on hover.
    expiry = page.locator(".field", has=page.locator("dt", has_text="Lease expires"))
    await expect(expiry.locator("time")).to_have_attribute("datetime", held["expires_at"])
    await shoot(page, tmp_path, "xss-detail")
    await page.goto(f"{live.url}/ui#/jobs/reserved")
    await expect(page.locator("td.worker")).to_have_text(XSS)
    await page.goto(f"{live.url}/ui#/jobs/failed")
    await expect(page.locator("td.exception")).to_have_text(XSS)
    await page.goto(f"{live.url}/ui#/failures")
    await expect(page.locator("table.groups td.exception")).to_have_text(XSS)

    assert dialogs == []
    assert await page.locator("main img, main script").count() == 0


async def test_open_mode_refuses_what_a_web_page_could_send(live: Live) -> None:
    """Against the live server: a form or text body, another site's Origin, a rebound
    Host; while curl-style requests and the page's own origin pass."""
    body = '{"name": "a", "payload": "{}"}'
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        response = await live.api.post("/jobs", content=body, headers={"content-type": kind})
        assert response.status_code == 415, response.text
        assert "Content-Type: application/json" in response.json()["detail"]
    evil = await live.api.post(
        "/jobs", json={"name": "a", "payload": "{}"}, headers={"Origin": "http://evil.example"}
    )
    assert evil.status_code == 403 and "cross-site" in evil.json()["detail"]
    rebound = await live.api.get("/jobs", headers={"Host": "evil.example:80"})
    assert rebound.status_code == 403 and "does not name this server" in rebound.json()["detail"]
    assert (await live.api.get("/jobs")).json()["items"] == []  # none of it enqueued

    port = live.url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        own = {"Origin": f"http://{host}", "Host": host}
        assert (
            await live.api.post("/jobs", json={"name": "a", "payload": "{}"}, headers=own)
        ).status_code == 201
    lease = await live.lease("a")
    assert (await live.api.post(f"/leases/{lease['id']}/ack")).status_code == 200  # no body


@pytest.fixture
def in_process(tmp_path: Path) -> Callable[..., httpx.AsyncClient]:
    """A client of an app built with these settings, through httpx's ASGI transport (as
    conftest's `client`, so `scope["server"]` is bgjobs.test). Only for what is answered
    before any route touches the database: the app's lifespan is not run."""

    def client(**settings: Any) -> httpx.AsyncClient:
        url = f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}"
        app = create_app(Settings(database_url=url, **settings))
        transport = httpx.ASGITransport(app=app)
        return httpx.AsyncClient(transport=transport, base_url="http://bgjobs.test")

    return client


async def test_allowed_hosts_and_tokens_relax_the_open_mode_checks(
    in_process: Callable[..., httpx.AsyncClient],
) -> None:
    """BGJOBS_ALLOWED_HOSTS adds names; with tokens, Origin and Host are the token's
    business, but a non-JSON body is still a 415."""
    async with in_process(allowed_hosts="bgjobs.internal, Other.Example") as open_app:
        for host, status in (
            ("bgjobs.internal:8000", 404),  # let through: no such route
            ("other.example", 404),
            ("bgjobs.test", 404),  # the address it was reached on (scope["server"])
            ("[::1]:8000", 404),
            ("x.example", 403),
            ("bgjobs.internal.x.example", 403),
        ):
            got = await open_app.get("/nowhere", headers={"Host": host})
            assert got.status_code == status, (host, got.text)
        assert (await open_app.get("/ui")).status_code == 200
    async with in_process(api_tokens="t=read") as guarded_app:
        elsewhere = {"Origin": "http://evil.example", "Host": "evil.example"}
        assert (await guarded_app.get("/auth/me", headers=elsewhere)).status_code == 401
        text = {"content-type": "text/plain"}
        assert (await guarded_app.post("/jobs", content="{}", headers=text)).status_code == 415


async def test_the_dashboard_ships_with_the_readme_screenshot(
    in_process: Callable[..., httpx.AsyncClient],
) -> None:
    """The shell is open and strict, from the package; the README shows it."""
    async with in_process(api_tokens="t=read") as app:
        for path, kind in (
            ("/ui", "text/html"),
            ("/ui/", "text/html"),
            ("/ui/app.js", "text/javascript"),
            ("/ui/app.css", "text/css"),
        ):
            response = await app.get(path)
            assert response.status_code == 200, path
            assert response.headers["content-type"].startswith(kind)
            assert response.headers["content-security-policy"] == CSP
        assert (await app.get("/ui/nothing.js")).status_code == 404
        script = (await app.get("/ui/app.js")).text
        page = (await app.get("/ui")).text
    assert "innerHTML" not in script and "eval(" not in script and "new Function" not in script
    assert "<script>" not in page  # every script is a file: no inline code
    assert re.search(r"<[^>]*\son[a-z]+\s*=", page) is None  # nor inline handlers
    readme = (ROOT / "README.md").read_text()
    assert "## Dashboard" in readme and "docs/dashboard.png" in readme
    assert (ROOT / "docs" / "dashboard.png").read_bytes().startswith(b"\x89PNG")
