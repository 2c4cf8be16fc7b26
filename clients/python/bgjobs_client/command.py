"""`bgjobs work`: run a command once per job, for workers in any language.

The payload goes to the command's stdin, the job's fields to its environment
(`BGJOBS_JOB_ID`, `BGJOBS_JOB_NAME`, `BGJOBS_ATTEMPTS`, `BGJOBS_MAX_RETRIES`). Exit 0 acks;
any other exit fails the job with the status and the end of stderr; past the timeout the
command gets SIGTERM, then SIGKILL, and the job fails.
"""

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from bgjobs_client.models import Job

STDERR_KEPT = 64 * 1024  # the end of stderr that goes into the job's exception
KILL_AFTER_S = 5.0  # between SIGTERM and SIGKILL on a timeout


class CommandFailed(Exception):
    """The command exited non-zero, or was stopped at its timeout."""


def command_handler(argv: Sequence[str], timeout: float | None) -> Callable[[Job], Awaitable[None]]:
    """A worker handler (async: a child process needs no thread) that runs `argv`."""

    async def run(job: Job) -> None:
        env = {
            **os.environ,
            "BGJOBS_JOB_ID": job.id,
            "BGJOBS_JOB_NAME": job.name,
            "BGJOBS_ATTEMPTS": str(job.attempts),
            "BGJOBS_MAX_RETRIES": str(job.max_retries if job.max_retries is not None else ""),
        }
        child = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=None,  # the worker's own stdout: the command's output is its log
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        talking = asyncio.ensure_future(child.communicate(job.payload.encode()))
        try:
            _, stderr = await asyncio.wait_for(asyncio.shield(talking), timeout)
        except TimeoutError:
            await stop(child, talking)
            raise CommandFailed(f"timed out after {timeout:g} s: sent SIGTERM") from None
        except asyncio.CancelledError:  # the worker gave up on the job: leave no child
            await stop(child, talking)
            raise
        if child.returncode != 0:
            tail = stderr[-STDERR_KEPT:].decode(errors="replace")
            raise CommandFailed(f"exit status {child.returncode}\n{tail}".rstrip())

    return run


async def stop(child: asyncio.subprocess.Process, talking: "asyncio.Future[Any]") -> None:
    """SIGTERM, then SIGKILL if it has not exited after KILL_AFTER_S."""
    with contextlib.suppress(ProcessLookupError):
        child.terminate()
    try:
        await asyncio.wait_for(child.wait(), KILL_AFTER_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()
    with contextlib.suppress(Exception):
        await talking
