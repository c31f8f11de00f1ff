"""The notifications service's own metrics, on the service registry (labels never carry PII)."""

from __future__ import annotations

from shared.metrics import E2E_BUCKETS, ServiceMetrics


class NotificationMetrics:
    """Decisions by channel and status, provider latency and errors, end-to-end latency."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.base = metrics
        self.decisions = metrics.counter(
            "decisions", "Notification decisions and status changes.", ("channel", "status", "reason"))
        self.duplicates = metrics.counter(
            "duplicate_triggers", "Triggers seen again and ignored (same trigger_id).")
        self.provider_seconds = metrics.histogram(
            "provider_seconds", "Provider call latency.", ("provider", "outcome"))
        self.provider_errors = metrics.counter(
            "provider_errors", "Provider errors by kind.", ("provider", "retryable"))
        self.e2e_seconds = metrics.histogram(
            "e2e_latency_seconds", "Trigger cause (occurred_at) to notification decision.",
            buckets=E2E_BUCKETS)
        self.in_flight = metrics.gauge("sends_in_flight", "Sends claimed and not yet recorded.", ("channel",))

    def status(self, channel: str | None, status: str, reason: str | None) -> None:
        self.decisions.labels(channel=channel or "none", status=status,
                              reason=_reason_label(reason)).inc()


def _reason_label(reason: str | None) -> str:
    """Keep label cardinality bounded: provider reasons collapse to their first word."""
    if not reason:
        return "none"
    return reason.split(" ", 1)[0][:40]
