"""The dispatcher: sends due notifications outside any database transaction.

Loop: claim due rows (SKIP LOCKED, committed) -> re-check consent, contact and quiet hours ->
send through the channel's provider under its concurrency limit -> record the result and its
outcome in one short transaction. A retryable failure goes back to the queue with exponential
back-off and jitter; a permanent one, or the last attempt, fails this channel and queues the
next consented channel, if any. Deferred rows are claimed when their time comes. Triggers held
for a profile that never came are swept at the end of their grace period (suppressed no_contact).

Crash safety: a claim belongs to a worker id whose PostgreSQL session advisory lock this
dispatcher holds on a dedicated connection. If the process dies, the lock goes with its
connection and the next dispatcher re-claims those rows at once, so nothing is lost and only
sends in flight at the crash can be repeated (providers get the same notification id).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import secrets
import time
from collections.abc import Mapping

import asyncpg

from services.notifications import store
from services.notifications.contacts import Contact, reveal
from services.notifications.metrics import NotificationMetrics
from services.notifications.outcomes import outcome_message
from services.notifications.policy import (
    DEFERRED,
    FAILED,
    NO_CONTACT,
    PENDING,
    SENT,
    SUPPRESSED,
    NotificationRules,
    check_before_send,
    next_fallback,
    notification_id,
    retry_delay,
)
from services.notifications.providers import (
    OutgoingMessage,
    Provider,
    ProviderError,
    SandboxProvider,
)
from shared.avro import AvroCodec
from shared.clock import Clock, EventClock
from shared.crypto import DecryptionError, Vault
from shared.db import TRANSIENT_DB_ERRORS
from shared.outbox import add_to_outbox

log = logging.getLogger(__name__)
SANDBOX_CLAIM = 500  # due sandbox sends claimed and recorded per transaction


class Dispatcher:
    """Sends what is due, per-provider concurrency bounded, until stopped."""

    def __init__(self, pool: asyncpg.Pool, dsn: str | None, *, providers: Mapping[str, Provider],
                 codec: AvroCodec, clock: Clock, rules: NotificationRules,
                 metrics: NotificationMetrics, lease_seconds: float = 120.0,
                 idle_poll: float = 0.25, rng: random.Random | None = None,
                 vault: Vault | None = None, sweep_interval: float = 1.0) -> None:
        self.pool = pool
        # Opens sealed contact points at the moment of sending, and nowhere else.
        self.vault = vault if vault is not None else Vault.from_env()
        self.dsn = dsn
        self.providers = dict(providers)
        self.codec = codec
        self.clock = clock
        # Under the event clock a due notification is checked and stamped as of its due time, not
        # as of wherever the replay's clock has got to when the timer looks.
        self.as_of_due = isinstance(clock, EventClock)
        self.rules = rules
        self.metrics = metrics
        self.lease_seconds = lease_seconds
        self.idle_poll = idle_poll
        self.rng = rng or random.Random()
        self.limits = {ch: max(1, int(rules.provider_concurrency.get(ch, 8))) for ch in self.providers}
        self.semaphores = {ch: asyncio.Semaphore(n) for ch, n in self.limits.items()}
        self.sandbox_only = all(isinstance(p, SandboxProvider) for p in self.providers.values())
        self.worker = secrets.randbits(62) or 1
        self._lock_conn: asyncpg.Connection | None = None
        self._in_flight: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._cycle_limit = 1  # how many the last cycle could have taken
        self.sent = 0
        # Held triggers are swept at most this often (wall time: pacing, not business time).
        self.sweep_interval = sweep_interval
        self._swept_at = float("-inf")

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Take this worker's liveness lock on a connection of its own."""
        if self.dsn is None:
            self._lock_conn = await self.pool.acquire()
        else:
            self._lock_conn = await asyncpg.connect(self.dsn)
        await self._lock_conn.execute("SELECT pg_advisory_lock($1)", self.worker)

    async def stop(self) -> None:
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        if self._lock_conn is not None:
            with contextlib.suppress(Exception):
                if self.dsn is None:
                    await self._lock_conn.execute("SELECT pg_advisory_unlock($1)", self.worker)
                    await self.pool.release(self._lock_conn)
                else:
                    await self._lock_conn.close()
            self._lock_conn = None

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Dispatch until cancelled."""
        if self._lock_conn is None:
            await self.start()
        try:
            while True:
                try:
                    claimed = await self.dispatch_once()
                except TRANSIENT_DB_ERRORS as exc:
                    log.warning("dispatcher retrying after %s", type(exc).__name__)
                    claimed = 0
                # A cycle that took less than it could took everything due: wait for more (a
                # wake, or the poll) rather than loop on at once for the few rows that fall due
                # meanwhile (measured: tiny cycles of ~8 round trips each at a steady 1,000/s).
                if claimed < self._cycle_limit:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):  # not wait_for: see shared/outbox.py
                        async with asyncio.timeout(self.idle_poll):
                            await self._wake.wait()
        finally:
            await self.stop()

    async def expire_held(self) -> int:
        """End triggers whose profile did not arrive within the grace period: no_contact."""
        now = self.clock.now()
        async with self._tx() as conn:
            rows = await store.expire_held(conn, now)
            if rows:
                await add_to_outbox(conn, [outcome_message(
                    self.codec, r, status=SUPPRESSED, reason=NO_CONTACT, occurred_at=now)
                    for r in rows])
        for _ in rows:
            self.metrics.status(None, SUPPRESSED, NO_CONTACT)
        return len(rows)

    async def dispatch_once(self) -> int:
        """Claim what is due and free capacity allows, and start sending it; returns how many."""
        if time.monotonic() - self._swept_at >= self.sweep_interval:
            self._swept_at = time.monotonic()
            await self.expire_held()
        capacity = sum(self.limits.values()) - len(self._in_flight)
        if self.sandbox_only:
            self._cycle_limit = max(capacity, SANDBOX_CLAIM)
            return await self._dispatch_sandbox(self._cycle_limit)
        self._cycle_limit = max(capacity, 1)
        rows, contacts, erased = await store.claim_due(
            self.pool, now=self.clock.now(), limit=capacity, worker=self.worker,
            lease_seconds=self.lease_seconds)
        self._start_sends(await self._send_sandbox_batch(rows, contacts, erased), contacts, erased)
        return len(rows)

    def _start_sends(self, rows: list[asyncpg.Record], contacts: Mapping[str, Contact],
                     erased: set[str]) -> None:
        """Each claimed row sent (or deferred, suppressed, failed over) in a task of its own."""
        for row in rows:
            task = asyncio.create_task(self._handle(row, contacts.get(row["customer_id"]),
                                                    row["customer_id"] in erased))
            self._in_flight.add(task)
            task.add_done_callback(self._done)

    async def _dispatch_sandbox(self, limit: int) -> int:
        """Every provider is the sandbox: due rows are locked, recorded sent and their outcomes
        written in one transaction, with no claim written first (a claim is a row update that only
        guards a provider call); what must be deferred, suppressed or failed over is claimed in that
        transaction and goes the ordinary way after it."""
        async with self._tx() as conn:
            rows, contacts, erased = await store.take_due(conn, now=self.clock.now(), limit=limit)
            if not rows:
                return 0
            sends, rest_ids = self._sandbox_split(rows, contacts, erased)
            updated = await store.mark_sent_many(conn, sends, attempt=True)
            await add_to_outbox(conn, [outcome_message(
                self.codec, u, status=SENT, reason=None, occurred_at=u["sent_at"]) for u in updated])
            rest = await store.claim_rows(conn, rest_ids, worker=self.worker, lease_seconds=self.lease_seconds)
        for u in updated:
            self.metrics.status(u["channel"], SENT, None)
        self.sent += len(updated)
        self._start_sends(rest, contacts, erased)
        return len(rows)

    def _sandbox_split(self, rows: list[asyncpg.Record], contacts: Mapping[str, Contact],
                       erased: set[str]) -> tuple[list[tuple[str, str, str, dt.datetime]], list[str]]:
        """Rows the sandbox sends now (notification_id, provider, message id, sent_at) and the ids
        of the rest, which go the ordinary way."""
        sends, rest = [], []
        for row in rows:
            channel = row["channel"]
            if not isinstance(self.providers.get(channel), SandboxProvider):
                rest.append(str(row["notification_id"]))
                continue
            contact = contacts.get(row["customer_id"])
            check = check_before_send(channel, contact, erased=row["customer_id"] in erased,
                                      now=self._now(row), tz_name=row["timezone"], rules=self.rules)
            if check.action != "send":
                rest.append(str(row["notification_id"]))
                continue
            try:
                if check.address is not None:
                    reveal(check.address, self.vault)  # an unreadable contact fails over, as live
            except DecryptionError:
                rest.append(str(row["notification_id"]))
                continue
            nid = str(row["notification_id"])
            sends.append((nid, "sandbox", f"sandbox-{nid}", self._now(row)))
        return sends, rest

    async def _send_sandbox_batch(self, rows: list[asyncpg.Record], contacts: Mapping[str, Contact],
                                  erased: set[str]) -> list[asyncpg.Record]:
        """Sandbox sends of a claim recorded in one transaction; returns the rows left to _handle.

        The sandbox calls nobody, so the one-transaction-per-send that bounds duplicate messages
        after a crash buys nothing here; a send that must be deferred, suppressed or failed over
        goes the ordinary way.
        """
        sends, rest_ids = self._sandbox_split(rows, contacts, erased)
        left = set(rest_ids)
        rest = [r for r in rows if str(r["notification_id"]) in left]
        if sends:
            async with self._tx() as conn:
                updated = await store.mark_sent_many(conn, sends)
                await add_to_outbox(conn, [outcome_message(
                    self.codec, u, status=SENT, reason=None, occurred_at=u["sent_at"]) for u in updated])
            for u in updated:
                self.metrics.status(u["channel"], SENT, None)
            self.sent += len(updated)
        return rest

    def _done(self, task: asyncio.Task) -> None:
        self._in_flight.discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("send task failed: %s", type(task.exception()).__name__)

    async def drain(self) -> None:
        """Wait for every send started so far (tests and benchmarks)."""
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)

    # -- one notification -----------------------------------------------------------------
    def _now(self, row: asyncpg.Record) -> dt.datetime:
        if self.as_of_due and row["due_at"] is not None:
            return row["due_at"]
        return self.clock.now()

    async def _handle(self, row: asyncpg.Record, contact: Contact | None, erased: bool) -> None:
        nid = str(row["notification_id"])
        channel = row["channel"]
        now = self._now(row)
        check = check_before_send(channel, contact, erased=erased, now=now,
                                  tz_name=row["timezone"], rules=self.rules)
        if check.action == "suppress":
            await self._record_final(row, SUPPRESSED, check.reason)
            return
        if check.action == "defer":
            async with self._tx() as conn:
                updated = await store.reschedule(conn, nid, status=DEFERRED, due_at=check.until,
                                                 reason=check.reason, undo_attempt=True)
                if updated is not None:
                    await add_to_outbox(conn, [outcome_message(
                        self.codec, updated, status=DEFERRED, reason=check.reason, occurred_at=now)])
            self.metrics.status(channel, DEFERRED, check.reason)
            return
        provider = self.providers[channel]
        try:
            to = reveal(check.address, self.vault) if check.address is not None else ""
        except DecryptionError:
            # The key that sealed it is no longer configured (or the blob was tampered with):
            # this channel cannot be used; the next one may have been sealed differently.
            log.error("contact point cannot be opened", extra={"notification_id": nid, "channel": channel})
            await self.fail_and_fail_over(row, "contact_unreadable", contact,
                                          from_statuses=(PENDING, DEFERRED))
            return
        message = OutgoingMessage(
            notification_id=nid, channel=channel, kind=row["kind"], locale=row["locale"] or "en",
            to=to, subject=row["subject"] or "", body=row["body"] or "",
            params=dict(row["params"] or {}))
        self.metrics.in_flight.labels(channel=channel).inc()
        started = time.perf_counter()
        try:
            async with self.semaphores[channel]:
                result = await provider.send(message)
        except ProviderError as exc:
            self.metrics.provider_seconds.labels(provider=provider.name, outcome="error").observe(
                time.perf_counter() - started)
            self.metrics.provider_errors.labels(provider=provider.name,
                                                retryable=str(exc.retryable).lower()).inc()
            await self._failed_attempt(row, contact, exc)
            return
        finally:
            self.metrics.in_flight.labels(channel=channel).dec()
        self.metrics.provider_seconds.labels(provider=provider.name, outcome="ok").observe(
            time.perf_counter() - started)
        sent_at = self._now(row)
        async with self._tx() as conn:
            updated = await store.mark_sent(conn, nid, provider=result.provider,
                                            provider_message_id=result.provider_message_id,
                                            sent_at=sent_at)
            if updated is not None:
                await add_to_outbox(conn, [outcome_message(
                    self.codec, updated, status=SENT, reason=None, occurred_at=sent_at)])
        self.sent += 1
        self.metrics.status(channel, SENT, None)

    async def _failed_attempt(self, row: asyncpg.Record, contact: Contact | None,
                              exc: ProviderError) -> None:
        nid = str(row["notification_id"])
        attempt = int(row["attempt"])
        now = self.clock.now()
        log.warning("send failed", extra={"notification_id": nid, "channel": row["channel"],
                                          "provider": exc.provider, "reason": exc.reason,
                                          "attempt": attempt, "retryable": exc.retryable})
        if exc.retryable and attempt < self.rules.max_attempts:
            delay = retry_delay(attempt, self.rules, self.rng.random())
            reason = f"retry {exc.reason}"
            async with self._tx() as conn:
                updated = await store.retry_later(conn, nid, delay_seconds=delay, reason=reason)
                if updated is not None:
                    await add_to_outbox(conn, [outcome_message(
                        self.codec, updated, status=PENDING, reason=reason, occurred_at=now)])
            self.metrics.status(row["channel"], PENDING, "retry")
            return
        await self.fail_and_fail_over(row, exc.reason, contact, from_statuses=(PENDING, DEFERRED))

    async def fail_and_fail_over(self, row: asyncpg.Record, reason: str, contact: Contact | None,
                                 *, from_statuses: tuple[str, ...],
                                 conn: asyncpg.Connection | None = None) -> None:
        """This channel failed: record it, then queue the next consented channel, if any."""
        if conn is None:
            async with self._tx() as own:
                await fail_over(own, self.codec, row, reason, contact, now=self.clock.now(),
                                from_statuses=from_statuses, metrics=self.metrics)
        else:
            await fail_over(conn, self.codec, row, reason, contact, now=self.clock.now(),
                            from_statuses=from_statuses, metrics=self.metrics)
        self.wake()

    async def _record_final(self, row: asyncpg.Record, status: str, reason: str | None) -> None:
        now = self.clock.now()
        async with self._tx() as conn:
            updated = await store.finish(conn, str(row["notification_id"]), status=status, reason=reason)
            if updated is not None:
                await add_to_outbox(conn, [outcome_message(
                    self.codec, updated, status=status, reason=reason, occurred_at=now)])
        self.metrics.status(row["channel"], status, reason)

    @contextlib.asynccontextmanager
    async def _tx(self):
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn


async def fail_over(conn: asyncpg.Connection, codec: AvroCodec, row: asyncpg.Record, reason: str,
                    contact: Contact | None, *, now: dt.datetime, from_statuses: tuple[str, ...],
                    metrics: NotificationMetrics | None = None) -> None:
    """Mark `row` failed and queue the same message on the next consented channel (same tx)."""
    failed = await store.finish(conn, str(row["notification_id"]), status=FAILED, reason=reason,
                                from_statuses=from_statuses)
    if failed is None:
        return
    messages = [outcome_message(codec, failed, status=FAILED, reason=reason, occurred_at=now)]
    if metrics is not None:
        metrics.status(row["channel"], FAILED, reason)
    channel, remaining = next_fallback(row["fallbacks"] or (), contact)
    if channel is not None:
        nid = notification_id(row["trigger_id"], channel)
        new = await store.insert_failover(conn, failed, nid=nid, channel=channel,
                                          fallbacks=remaining, due_at=now)
        if new is not None:
            messages.append(outcome_message(codec, new, status=PENDING, reason="failover",
                                            occurred_at=now))
            if metrics is not None:
                metrics.status(channel, PENDING, "failover")
    await add_to_outbox(conn, messages)
