"""Prometheus metrics of one app: what the queue did (an Observer), HTTP timings by
route template, and job counts by state read from the database at scrape time.

Each app has its own registry (tests build many apps in one process). Every labelled
child is created once and cached, so an update on the hot path is a dict lookup and an
increment. Job ids and worker ids are never labels; job names are, up to a cap.
"""

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.queue.models import Lease
from app.queue.observer import Outcome, Reason
from app.queue.ports import NameCounts

OTHER = "_other"
STATES = ("available", "scheduled", "reserved", "succeeded", "failed")
# Jobs take from milliseconds to hours.
JOB_BUCKETS = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
    1800, 3600, 7200, 14400, 43200,
)  # fmt: skip
HTTP_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class Metrics:
    """The app's registry and the Observer the queue service reports to."""

    def __init__(self, max_names: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.max_names = max_names
        self._names: dict[str, str] = {}
        self.job_counts: Sequence[NameCounts] = ()  # set just before each scrape
        self.waiting: Callable[[], int] = lambda: 0  # the service's parked long polls
        reg = self.registry
        self._enqueued_total = Counter(
            "bgjobs_jobs_enqueued", "Jobs enqueued.", ["name"], registry=reg
        )
        self._finished_total = Counter(
            "bgjobs_jobs_finished",
            "Attempts ended: outcome succeeded|failed|retrying, reason ok (ack), error "
            "(fail) or expired (lease expired).",
            ["name", "outcome", "reason"],
            registry=reg,
        )
        self._wait = Histogram(
            "bgjobs_job_wait_seconds",
            "From available_at to leased.",
            ["name"],
            buckets=JOB_BUCKETS,
            registry=reg,
        )
        self._run = Histogram(
            "bgjobs_job_run_seconds",
            "From leased to ack or fail.",
            ["name"],
            buckets=JOB_BUCKETS,
            registry=reg,
        )
        self._http = Histogram(
            "bgjobs_http_request_duration_seconds",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            buckets=HTTP_BUCKETS,
            registry=reg,
        )
        Gauge(
            "bgjobs_long_polls_waiting", "Long polls parked in this process.", registry=reg
        ).set_function(lambda: self.waiting())
        reg.register(_JobCounts(self))
        self._children: dict[tuple[object, ...], Counter | Histogram] = {}

    def label(self, name: str) -> str:
        """The name itself for the first `max_names` distinct names, then `_other`
        (names past the cap are not remembered, so minting names costs no memory)."""
        found = self._names.get(name)
        if found is not None:
            return found
        if len(self._names) >= self.max_names:
            return OTHER
        self._names[name] = name
        return name

    def _child(self, metric: Counter | Histogram, *labels: str) -> Counter | Histogram:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- the Observer -------------------------------------------------------------------

    def enqueued(self, name: str, count: int) -> None:
        self._child(self._enqueued_total, self.label(name)).inc(count)  # type: ignore[union-attr]

    def leased(self, leases: Sequence[Lease], now: datetime) -> None:
        for lease in leases:
            job = lease.job
            waited = max(0.0, (now - job.available_at).total_seconds())
            self._child(self._wait, self.label(job.name)).observe(waited)  # type: ignore[union-attr]

    def finished(
        self,
        name: str,
        outcome: Outcome,
        reason: Reason,
        leased_at: datetime | None,
        now: datetime,
    ) -> None:
        label = self.label(name)
        self._child(self._finished_total, label, outcome, reason).inc()  # type: ignore[union-attr]
        if leased_at is not None and reason != "expired":
            ran = max(0.0, (now - leased_at).total_seconds())
            self._child(self._run, label).observe(ran)  # type: ignore[union-attr]

    # -- HTTP ---------------------------------------------------------------------------

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"
        self._child(self._http, method, route, str(status)).observe(seconds)  # type: ignore[union-attr]


class _JobCounts(Collector):
    """`bgjobs_jobs{name,state}` from the counts read for this scrape (names past the cap
    added up under `_other`)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "bgjobs_jobs",
            "Jobs by name and state, from the database (the same on every replica).",
            labels=["name", "state"],
        )
        totals: dict[str, list[int]] = {}
        for counts in self._metrics.job_counts:
            values = totals.setdefault(self._metrics.label(counts.name), [0] * len(STATES))
            for i, state in enumerate(STATES):
                values[i] += getattr(counts, state)
        for name, values in sorted(totals.items()):
            for state, value in zip(STATES, values, strict=True):
                family.add_metric([name, state], value)
        yield family
