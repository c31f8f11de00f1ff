"""What the fault suite did, gathered across tests and printed at the end of the run."""

from __future__ import annotations

from collections import Counter

FAULTS: Counter[str] = Counter()
EVENTS: Counter[str] = Counter()
INVARIANTS: Counter[str] = Counter()
VIOLATIONS: list[str] = []


def fault(kind: str, n: int = 1) -> None:
    FAULTS[kind] += n


def events(kind: str, n: int) -> None:
    EVENTS[kind] += n


def invariant(name: str, held: bool, detail: str = "") -> bool:
    """Count a checked invariant; a broken one is remembered (the test asserts on the result)."""
    INVARIANTS[name] += 1
    if not held:
        VIOLATIONS.append(f"{name}: {detail}" if detail else name)
    return held


def summary_lines() -> list[str]:
    if not FAULTS and not INVARIANTS:
        return []
    return [
        "fault suite: faults injected " + ", ".join(f"{k}={v}" for k, v in sorted(FAULTS.items())),
        "fault suite: events processed " + ", ".join(f"{k}={v}" for k, v in sorted(EVENTS.items())),
        f"fault suite: invariants checked {sum(INVARIANTS.values())} "
        f"({', '.join(sorted(INVARIANTS))}); violations {len(VIOLATIONS)}",
        *[f"  VIOLATION {v}" for v in VIOLATIONS],
    ]
