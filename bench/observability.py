"""How long GET /stats, GET /metrics and the dashboard take at a large backlog, on a
real server.

Fills a fresh database with `--jobs` jobs (over `--names` names, a tenth of them
scheduled an hour ahead, plus some leased, acked and failed) through the app's own
storage, starts `bgjobs serve` on it, and times each endpoint with the counts cache
cold (every request waits out the 1 s cache first) and warm. Then every request the
dashboard's views make (a page of each state, a name filter, a payload search that
finds nothing and so reads its whole scan budget, the failure groups, a job), and, with
`--browser`, each view loaded in headless Chromium until its data shows.

    .venv/bin/python bench/observability.py --jobs 1000000                 # SQLite
    .venv/bin/python bench/observability.py --database-url postgresql://...  # PostgreSQL
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.queue.models import NewJob  # noqa: E402
from app.queue.ports import FailItem  # noqa: E402
from app.queue.service import new_job_ids  # noqa: E402
from app.settings import normalize_database_url  # noqa: E402
from app.storage import open_storage  # noqa: E402

BATCH = 1000


async def fill(url: str, jobs: int, names: int) -> None:
    storage = open_storage(url)
    await storage.migrate()
    now = datetime.now(UTC)
    later = now + timedelta(hours=1)
    try:
        for start in range(0, jobs, BATCH):
            ids = new_job_ids(min(BATCH, jobs - start))
            batch = [
                NewJob(job_id, f"job_{(start + i) % names}", "x" * 64, 0, now,
                       later if (start + i) % 10 == 0 else now - timedelta(minutes=5))
                for i, job_id in enumerate(ids)
            ]  # fmt: skip
            await storage.enqueue_many(batch, now)
        for name in range(names):  # some history and some in flight, per name
            leases = await storage.reserve([f"job_{name}"], "w", 35, now, later)
            await storage.ack_many([(lease.job.id, lease.id) for lease in leases[:20]], now)
            fails = [
                FailItem(lease.job.id, lease.id, f"SMTP 55{i % 3}\ntrace", lambda *_: None)
                for i, lease in enumerate(leases[20:30])  # the last 5 stay reserved
            ]
            await storage.fail_many(fails, now)
    finally:
        await storage.close()


def timed(client: httpx.Client, path: str, cold: bool, rounds: int) -> list[float]:
    took = []
    for _ in range(rounds):
        if cold:
            time.sleep(1.05)  # past the counts cache
        started = time.perf_counter()
        response = client.get(path)
        took.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return took


def report(label: str, took: list[float]) -> None:
    took = sorted(took)
    print(f"{label:32} median {statistics.median(took):7.2f} ms   max {took[-1]:7.2f} ms")


# What the views ask for (app/ui/static/app.js): pages of 50, filters, a search.
DASHBOARD = (
    "/jobs?state=available&limit=50",
    "/jobs?state=scheduled&limit=50",
    "/jobs?state=reserved&limit=50",
    "/jobs?state=available&name=job_3&limit=50",
    "/jobs?state=available&q=no-such-text&limit=50",
    "/jobs/succeeded?limit=50",
    "/jobs/failed?limit=50",
    "/jobs/failed?q=SMTP%20551&limit=50",
    "/jobs/failed/groups",
)
# Each view, and what shows once its data is in.
VIEWS = (
    ("overview", "/ui#/", 'tr[data-name="job_0"] td[data-state="available"]'),
    ("available jobs", "/ui#/jobs/available", "table.jobs tbody tr[data-id]"),
    ("failed jobs", "/ui#/jobs/failed", "table.jobs tbody tr[data-id]"),
    ("failure groups", "/ui#/failures", "table.groups tbody tr"),
)


def dashboard(client: httpx.Client, rounds: int, when: str) -> None:
    print(f"the dashboard's requests (warm{when}):")
    job_id = client.get("/jobs?limit=1").json()["items"][0]["id"]
    for path in (*DASHBOARD, f"/jobs/{job_id}"):
        report(f"GET {path}", timed(client, path, False, rounds))


async def analyze(url: str) -> None:
    """What autovacuum does a while after a burst: right after the fill, the planner
    has no statistics for the jobs table yet."""
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def browse(url: str, rounds: int) -> None:
    """Each view in a fresh page of headless Chromium: navigation to data on screen."""
    from playwright.async_api import async_playwright

    print("the dashboard in Chromium, navigation until the data shows:")
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox"]
        )
        try:
            for view, path, ready in VIEWS:
                took = []
                for _ in range(rounds):
                    page = await browser.new_page()
                    started = time.perf_counter()
                    await page.goto(url + path)
                    await page.wait_for_selector(ready, timeout=30_000)
                    took.append((time.perf_counter() - started) * 1000)
                    await page.close()
                report(f"/ui {view}", took)
        finally:
            await browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--names", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--database-url", help="default: a new SQLite file")
    parser.add_argument("--browser", action="store_true", help="also time /ui in Chromium")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bgjobs-obs-")
    url = normalize_database_url(args.database_url or f"sqlite:///{folder}/bench.db")
    started = time.perf_counter()
    asyncio.run(fill(url, args.jobs, args.names))
    print(
        f"filled {args.jobs} jobs over {args.names} names in {time.perf_counter() - started:.0f} s"
    )
    port = "18731"
    env = {**os.environ, "BGJOBS_ACCESS_LOG": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", port, "--database-url", url],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for _ in range(200):
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            print(client.get("/stats").json()["totals"]["counts"])
            for path in ("/stats", "/stats?series=60m", "/metrics"):
                report(f"GET {path} (cold)", timed(client, path, True, args.rounds))
                report(f"GET {path} (warm)", timed(client, path, False, args.rounds))
            dashboard(client, args.rounds, "")
            if url.startswith("postgresql"):  # as above with fresh planner statistics
                asyncio.run(analyze(url))
                dashboard(client, args.rounds, ", after ANALYZE")
        if args.browser:
            asyncio.run(browse(f"http://127.0.0.1:{port}", args.rounds))
    finally:
        server.terminate()
        server.wait(timeout=15)


if __name__ == "__main__":
    main()
