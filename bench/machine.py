"""What the figures were measured on: CPU, load, and the disk under the database.

The targets hold on the disk the project runs on, so the benchmark keeps its databases
on the repository's disk (never a tmpfs) and prints that filesystem and the latency of one
4 KiB write + fsync there: a commit cannot be faster than that.
"""

from __future__ import annotations

import os
import platform
import sqlite3
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from children import REPO_ROOT

MEMORY_FILESYSTEMS = {"tmpfs", "ramfs"}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def describe_machine() -> str:
    cores = os.cpu_count()
    memory_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return (
        f"{cpu_model()}, {cores} cores, "
        f"{memory_kib / 2**20:.1f} GiB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
    )


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def busy_cpu_seconds() -> float:
    """CPU time the whole machine spent busy so far (all cores, every process, steal too)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU of this process and of its children that have ended (servers, wrk, generators)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def busy_share(seconds: float = 3) -> float:
    """Share of all cores that other processes keep busy over `seconds`, this one excluded."""
    busy, own, start = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    used = busy_cpu_seconds() - busy - (own_cpu_seconds() - own)
    return max(used, 0.0) / ((time.perf_counter() - start) * (os.cpu_count() or 1))


def wait_for_quiet(limit_s: float, threshold: float = 0.10) -> str:
    """Wait up to `limit_s` until other processes use at most `threshold` of the machine (on a
    shared machine, another engineer's test run can halve every figure)."""
    deadline = time.monotonic() + limit_s
    while True:
        share = busy_share()
        if share <= threshold:
            return f"waited for a quiet machine: other processes at {share:.0%} at start"
        if time.monotonic() >= deadline:
            return f"gave up waiting for a quiet machine after {limit_s:g} s ({share:.0%} busy)"
        print(f"waiting for a quiet machine: other processes at {share:.0%}", flush=True)


def code_under_test() -> str:
    """The commit, and whether app/ has changes not committed yet (read-only git calls)."""

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        return result.stdout.strip() if result.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown commit"
    changed = [line for line in git("status", "--porcelain", "--", "app").splitlines() if line]
    return f"{head}" + (
        f" + uncommitted changes to {len(changed)} files in app/" if changed else ""
    )


def filesystem(path: Path) -> tuple[str, str, str]:
    """(type, device, mount point) of the mount holding `path`: the longest matching one."""
    real, best = str(path.resolve()), ("?", "?", "")
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mount, kind = line.split()[:3]
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[2]):
            best = (kind, device, mount)
    return best


def workdir_parent() -> Path:
    """/var/tmp, else the folder holding the repository, else the temp dir: the first that
    is on a real disk (the same disk as the repository, here)."""
    for candidate in (Path("/var/tmp"), REPO_ROOT.parent, Path(tempfile.gettempdir())):
        if candidate.is_dir() and os.access(candidate, os.W_OK):
            if filesystem(candidate)[0] not in MEMORY_FILESYSTEMS:
                return candidate
    return REPO_ROOT.parent


def fsync_latency_ms(folder: Path, count: int = 200) -> tuple[float, float]:
    """p50 and p99 of writing 4 KiB at the end of a file and fsyncing it, in `folder`."""
    block, samples = os.urandom(4096), []
    path = folder / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(count):
            start = time.perf_counter()
            os.write(fd, block)
            os.fsync(fd)
            samples.append((time.perf_counter() - start) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    cuts = statistics.quantiles(samples, n=100)
    return statistics.median(samples), cuts[98]


def dirty_mib() -> float:
    """Data the kernel still has to write back (Dirty + Writeback in /proc/meminfo)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(fields[k].split()[0]) for k in ("Dirty", "Writeback")) / 1024


def settle_disk() -> str:
    """Write back what earlier rows left dirty, so that an idle measurement does not pay
    for it: behind hundreds of MiB of write-back an fsync waits for ext4's journal."""
    before, start = dirty_mib(), time.perf_counter()
    os.sync()
    return f"{before:.0f} MiB written back first (sync took {time.perf_counter() - start:.2f} s)"


def describe_disk(folder: Path) -> str:
    kind, device, mount = filesystem(folder)
    p50, p99 = fsync_latency_ms(folder)
    warning = "  WARNING: memory filesystem" if kind in MEMORY_FILESYSTEMS else ""
    return (
        f"{folder} on {kind} ({device} at {mount}); 4 KiB write+fsync "
        f"p50 {p50:.2f} ms, p99 {p99:.2f} ms (200 samples){warning}"
    )
