"""The live terminal dashboard of `omnicrm up`: each service's /metrics, polled and drawn with rich.

Polling (I/O) and drawing are apart: `Dashboard.poll()` reads the metrics into a `Snapshot`,
`render(snapshot)` is a pure function of it. Any metric a service does not expose (yet) shows
as "—"; a service that does not answer shows as down with one line saying why.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

# The name the brief gave, and the one ServiceMetrics.counter("triggers_fired") produces.
TRIGGERS_FIRED = ("omnicrm_triggers_fired_total", "omnicrm_triggers_triggers_fired_total")
NOTIFICATION_DECISIONS = "omnicrm_notifications_decisions_total"
RATE_WINDOW_SECONDS = 5.0
Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclass(frozen=True)
class ServiceStats:
    """One service as last seen: totals from its counters, rates from the last few polls."""

    name: str
    url: str
    up: bool
    error: str | None = None
    consumed: float | None = None
    produced: float | None = None
    lag: float | None = None
    dlq: float | None = None
    in_rate: float | None = None
    out_rate: float | None = None


@dataclass(frozen=True)
class Snapshot:
    """Everything the dashboard draws, at one moment."""

    at: float
    services: tuple[ServiceStats, ...]
    triggers: Mapping[str, float] = field(default_factory=dict)
    notifications: Mapping[tuple[str, str], float] = field(default_factory=dict)
    messages: tuple[str, ...] = ()
    traffic: str | None = None
    problems: tuple[str, ...] = ()
    elapsed: float | None = None

    def total_traffic(self, service: str) -> float:
        """Records a service has handled (consumed, else produced): the demo test's yardstick."""
        for s in self.services:
            if s.name == service:
                return max(s.consumed or 0.0, s.produced or 0.0)
        return 0.0


def parse_metrics(text: str) -> Samples:
    """Prometheus text -> sample name -> [(labels, value)]."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def _sum(samples: Samples, name: str) -> float | None:
    values = samples.get(name)
    return None if values is None else sum(v for _, v in values)


def service_stats(name: str, url: str, samples: Samples) -> ServiceStats:
    """A service's totals from its samples; absent metrics stay None."""
    prefix = f"omnicrm_{name}"
    return ServiceStats(
        name=name, url=url, up=True,
        consumed=_sum(samples, f"{prefix}_events_consumed_total"),
        produced=_sum(samples, f"{prefix}_events_produced_total"),
        lag=_sum(samples, f"{prefix}_consumer_lag"),
        dlq=_sum(samples, f"{prefix}_dlq_total"),
    )


def by_labels(samples: Samples, name: str, labels: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for sample_labels, value in samples.get(name, []):
        key = tuple(sample_labels.get(label, "?") for label in labels)
        out[key] = out.get(key, 0.0) + value
    return out


def _rate(new: float | None, old: float | None, seconds: float) -> float | None:
    if new is None or old is None or seconds <= 0:
        return None
    return max(0.0, (new - old) / seconds)  # a restarted service resets its counters


def with_rates(current: Snapshot, earlier: Snapshot | None) -> Snapshot:
    """`current` with per-service events/s measured against `earlier`."""
    if earlier is None:
        return current
    seconds = current.at - earlier.at
    before = {s.name: s for s in earlier.services}
    services = []
    for s in current.services:
        old = before.get(s.name)
        if old is None or not s.up or not old.up:
            services.append(s)
            continue
        services.append(replace(s, in_rate=_rate(s.consumed, old.consumed, seconds),
                                out_rate=_rate(s.produced, old.produced, seconds)))
    return replace(current, services=tuple(services))


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def render(snapshot: Snapshot) -> RenderableType:
    """The dashboard for one snapshot (pure: no I/O, no clock)."""
    title = Text("omnicrm", style="bold cyan")
    if snapshot.elapsed is not None:
        title.append(f"  up {int(snapshot.elapsed) // 60}m{int(snapshot.elapsed) % 60:02d}s",
                     style="dim")
    if snapshot.traffic:
        title.append(f"  traffic: {snapshot.traffic}")

    services = Table(title="services", expand=True, title_justify="left")
    for column in ("service", "status", "in/s", "out/s", "consumed", "produced", "lag", "dlq"):
        services.add_column(column, justify="left" if column in ("service", "status") else "right")
    for s in snapshot.services:
        status = Text("up", style="green") if s.up else Text("down", style="bold red")
        services.add_row(s.name, status, _num(s.in_rate, 1), _num(s.out_rate, 1),
                         _num(s.consumed), _num(s.produced), _num(s.lag),
                         Text(_num(s.dlq), style="red" if s.dlq else ""))

    triggers = Table(title="triggers fired", expand=True, title_justify="left")
    triggers.add_column("kind")
    triggers.add_column("fired", justify="right")
    for kind, value in sorted(snapshot.triggers.items()):
        triggers.add_row(kind, _num(value))
    if not snapshot.triggers:
        triggers.add_row("—", "—")

    notes = Table(title="notifications", expand=True, title_justify="left")
    statuses = sorted({status for _, status in snapshot.notifications})
    notes.add_column("channel")
    for status in statuses or ["—"]:
        notes.add_column(status, justify="right")
    channels = sorted({channel for channel, _ in snapshot.notifications})
    for channel in channels:
        notes.add_row(channel, *(_num(snapshot.notifications.get((channel, st))) for st in statuses))
    if not channels:
        notes.add_row("—", "—")

    parts: list[RenderableType] = [title, services, triggers, notes]
    if snapshot.messages:
        parts.append(Panel("\n".join(snapshot.messages), title="last messages", title_align="left"))
    for problem in snapshot.problems:
        parts.append(Text(f"! {problem}", style="bold red"))
    parts.append(Text("Ctrl-C stops everything", style="dim"))
    return Group(*parts)


class Dashboard:
    """Polls each service's /metrics; keeps a few seconds of history for smooth rates."""

    def __init__(self, services: Mapping[str, str], *, client: httpx.Client | None = None,
                 clock: Callable[[], float] = time.monotonic, timeout: float = 0.8) -> None:
        self.services = dict(services)
        self.client = client or httpx.Client(timeout=timeout)
        self.clock = clock
        self.started = clock()
        self.history: deque[Snapshot] = deque()

    def poll(self, *, traffic: str | None = None, problems: Iterable[str] = (),
             messages: Iterable[str] = ()) -> Snapshot:
        stats: list[ServiceStats] = []
        triggers: dict[str, float] = {}
        notifications: dict[tuple[str, str], float] = {}
        issues = list(problems)
        for name, url in self.services.items():
            try:
                response = self.client.get(f"{url}/metrics")
                response.raise_for_status()
                samples = parse_metrics(response.text)
            except (httpx.HTTPError, ValueError) as exc:
                stats.append(ServiceStats(name=name, url=url, up=False, error=type(exc).__name__))
                issues.append(f"{name}: /metrics at {url} did not answer ({type(exc).__name__})")
                continue
            stats.append(service_stats(name, url, samples))
            for metric in TRIGGERS_FIRED:
                for (kind,), value in by_labels(samples, metric, ("kind",)).items():
                    triggers[kind] = triggers.get(kind, 0.0) + value
            for key, value in by_labels(samples, NOTIFICATION_DECISIONS, ("channel", "status")).items():
                notifications[(key[0], key[1])] = notifications.get((key[0], key[1]), 0.0) + value
        now = self.clock()
        snapshot = Snapshot(at=now, services=tuple(stats), triggers=triggers,
                            notifications=notifications, messages=tuple(messages),
                            traffic=traffic, problems=tuple(issues), elapsed=now - self.started)
        while self.history and now - self.history[0].at > RATE_WINDOW_SECONDS:
            self.history.popleft()
        snapshot = with_rates(snapshot, self.history[0] if self.history else None)
        self.history.append(snapshot)
        return snapshot

    def close(self) -> None:
        self.client.close()


class MessageSampler:
    """The last few rendered messages of customers the traffic just touched (best effort).

    There is no "recent messages" endpoint, so it looks a handful of customers up by email on
    identity and reads their notifications; anything that fails just leaves the panel as it was.
    """

    def __init__(self, identity_url: str, notifications_url: str, key: str, *,
                 client: httpx.Client | None = None, every: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.identity, self.notifications = identity_url, notifications_url
        self.headers = {"Authorization": f"Bearer {key}"}
        self.client = client or httpx.Client(timeout=1.0)
        self.every, self.clock = every, clock
        self.last = -every
        self.messages: tuple[str, ...] = ()
        self.seen: dict[str, str] = {}

    def sample(self, emails: Iterable[str]) -> tuple[str, ...]:
        if self.clock() - self.last < self.every:
            return self.messages
        self.last = self.clock()
        found: list[tuple[str, str]] = []
        for email in emails:
            try:
                found.extend(self._messages_of(email))
            except (httpx.HTTPError, ValueError, KeyError):
                continue
        if found:
            for decided, line in found:
                self.seen[line] = decided
            latest = sorted(self.seen.items(), key=lambda kv: kv[1], reverse=True)[:5]
            self.seen = dict(latest)
            self.messages = tuple(line for line, _ in latest)
        return self.messages

    def _messages_of(self, email: str) -> list[tuple[str, str]]:
        found = self.client.get(f"{self.identity}/v1/customers/lookup", params={"email": email},
                                headers=self.headers)
        if found.status_code != 200:
            return []
        customer_id = found.json()["customer_id"]
        answer = self.client.get(f"{self.notifications}/v1/customers/{customer_id}/notifications",
                                 params={"limit": 5}, headers=self.headers)
        if answer.status_code != 200:
            return []
        out = []
        for note in answer.json().get("notifications", []):
            if note.get("body"):
                text = " ".join(str(note["body"]).split())
                line = (f"{note.get('kind', '?')} · {note.get('channel') or '-'} · "
                        f"{note.get('status', '?')}: {text[:90]}")
                out.append((str(note.get("decided_at") or note.get("sent_at") or ""), line))
        return out

    def close(self) -> None:
        self.client.close()
