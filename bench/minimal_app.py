"""The yardstick for `POST /jobs`: the least a FastAPI endpoint does, with no database.

One pydantic body `{name, payload}`, validated, returned through a `response_model` with a
201, under the same uvicorn as the server (uvloop, httptools, access log off, log level
warning). bench/run.py measures it with the same wrk command as the real server, in the
same run, and reports the server's enqueue rate as a fraction of this one: absolute rates
drift by a third between runs on a shared machine, the ratio much less.

    uvicorn --app-dir bench minimal_app:app --loop uvloop --http httptools --no-access-log
"""

from fastapi import FastAPI
from pydantic import BaseModel


class Job(BaseModel):
    name: str
    payload: str


app = FastAPI()


@app.post("/jobs", response_model=Job, status_code=201)
async def enqueue(job: Job) -> Job:
    return job


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    """So that the benchmark waits for it the way it waits for the real server."""
    return {"status": "ok"}
