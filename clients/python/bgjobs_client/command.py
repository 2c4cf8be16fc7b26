"""`bgjobs work`: run a command once per job, for workers in any language.

The payload goes to the command's stdin, the job's fields to its environment
(`BGJOBS_JOB_ID`, `BGJOBS_JOB_NAME`, `BGJOBS_ATTEMPTS`, `BGJOBS_MAX_RETRIES`). Exit 0 acks;
any other exit fails the job with the status and the end of stderr; past the timeout the
command gets SIGTERM, then SIGKILL, and the job fails.
"""

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from bgjobs_client.models import Job

# The end of stderr that goes into the job's exception (the server takes 64 KiB in all).
STDERR_KEPT = 60 * 1024
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
            start_new_session=True,  # its own process group: a timeout stops its children too
        )
        talking = asyncio.ensure_future(converse(child, job.payload.encode()))
        try:
            stderr = await asyncio.wait_for(asyncio.shield(talking), timeout)
        except TimeoutError:
            await stop(child, talking)
            raise CommandFailed(f"timed out after {timeout:g} s: sent SIGTERM") from None
        except asyncio.CancelledError:  # the worker gave up on the job: leave no child
            await stop(child, talking)
            raise
        if child.returncode != 0:
            tail = stderr.decode(errors="replace")
            raise CommandFailed(f"exit status {child.returncode}\n{tail}".rstrip())

    return run


async def converse(child: asyncio.subprocess.Process, payload: bytes) -> bytes:
    """Write the payload to stdin, and read stderr to the end keeping only its last
    STDERR_KEPT bytes (a chatty command must not fill the worker's memory)."""
    stdin, stderr = child.stdin, child.stderr
    assert stdin is not None and stderr is not None

    async def feed() -> None:  # beside the reading: a big payload must not deadlock
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it need not read
            stdin.write(payload)
            await stdin.drain()
        stdin.close()

    feeding = asyncio.ensure_future(feed())
    kept = bytearray()
    while chunk := await stderr.read(65536):
        kept += chunk
        del kept[:-STDERR_KEPT]
    await feeding
    await child.wait()
    return bytes(kept)


async def stop(child: asyncio.subprocess.Process, talking: "asyncio.Future[Any]") -> None:
    """SIGTERM to the command's process group, then SIGKILL if it has not exited after
    KILL_AFTER_S (a shell's children would otherwise hold its stderr open)."""
    signal_group(child, signal.SIGTERM)
    try:
        await asyncio.wait_for(child.wait(), KILL_AFTER_S)
    except TimeoutError:
        pass
    signal_group(child, signal.SIGKILL)  # whatever of the group is left
    await child.wait()
    with contextlib.suppress(Exception):
        await talking


def signal_group(child: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, sig)
