"""Child processes of the benchmark: pinned to a core, tracked, always stopped.

Every child (server, minimal app, wrk, aiohttp generator) is started through `Children`,
which remembers it so that `stop_all` (called from the benchmark's `finally`, also on
Ctrl-C and SIGTERM) ends exactly the processes this run started, by their ids. On Linux a
child also gets SIGTERM from the kernel if the benchmark itself is SIGKILLed.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# No proxy from the environment may sit between the benchmark and its servers.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(RuntimeError):
    """Something broke (a child died, requests failed): the run exits non-zero."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _in_child() -> None:
    """Before exec: die with the benchmark (PR_SET_PDEATHSIG survives exec) and lift the
    open-file limit to its hard cap, since 1,000 parked long polls need 1,000+ sockets."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pinned(core: int, command: Sequence[str]) -> list[str]:
    """`taskset` execs the command, so the pid we get is the measured process itself."""
    return ["taskset", "-c", str(core), *command]


class Children:
    """The processes this run started, so they can all be stopped in one `finally`."""

    def __init__(self) -> None:
        self._live: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout: Any = subprocess.DEVNULL,
        stderr: Any = None,
    ) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            list(command),
            cwd=REPO_ROOT,
            env=dict(env) if env is not None else None,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # Ctrl-C reaches the benchmark only; it stops them in order
            preexec_fn=_in_child,
        )
        self._live.append(process)
        return process

    def live(self) -> list[subprocess.Popen[bytes]]:
        return [process for process in self._live if process.poll() is None]

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 15) -> None:
        """SIGTERM (a server then answers its long polls and exits), SIGKILL if it lingers."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process in self._live:
            self._live.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self._live)):
            self.stop(process, timeout=5)


# -- /proc readings ----------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system time of a process, all its threads included."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu_seconds(root: int) -> float:
    """CPU of a process and all its descendants, live or reaped (PostgreSQL's backends)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(
                    int(entry.name)
                )
            except (OSError, ValueError, IndexError):
                continue
    total, pending = 0.0, [root]
    while pending:
        pid = pending.pop()
        pending.extend(children.get(pid, []))
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        reaped = int(fields[13]) + int(fields[14]) if pid == root else 0
        total += (int(fields[11]) + int(fields[12]) + reaped) / CLOCK_TICKS
    return total


def status_kib(pid: int, key: str) -> int:
    """A `kB` line of /proc/PID/status, such as VmHWM (peak resident set) or VmRSS."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def status_line(pid: int, key: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return line.split(":", 1)[1].strip()
    return "?"


# -- HTTP from the orchestrator (probes, readiness) --------------------------------------------


@dataclass(slots=True)
class Reply:
    status: int
    body: Any


def http(method: str, url: str, body: Any = None, timeout: float = 30) -> Reply:
    """One request with the standard library: the orchestrator only probes and waits."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return Reply(status, json.loads(raw) if raw else None)
    except ValueError:
        return Reply(status, raw.decode(errors="replace"))


def wait_ready(process: subprocess.Popen[bytes], url: str, log: Path, seconds: float = 60) -> None:
    """Until GET /readyz is 200; a child that exits first is an error with its log."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if http("GET", f"{url}/readyz", timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise BenchError(f"server not ready after {seconds:.0f} s:\n{log.read_text()}")
