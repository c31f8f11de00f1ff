"""Ports for test and benchmark stacks come from outside the range outgoing connections draw from,
so a stack's own client connections cannot take a port between its pick and the listener's bind."""

from __future__ import annotations

import socket

from shared.stack import _ephemeral_low, free_port


def test_free_ports_are_below_the_ephemeral_range_distinct_and_bindable():
    low = _ephemeral_low()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(p < low for p in ports), "a port from the range client connections take theirs from"
    for port in ports[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
            s.listen()


def test_a_port_someone_listens_on_is_passed_over(monkeypatch):
    from shared import stack

    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        taken = busy.getsockname()[1]
        picks = iter([taken, taken, 23456])
        monkeypatch.setattr(stack.random, "randrange", lambda lo, hi: next(picks))
        monkeypatch.setattr(stack, "_ephemeral_low", lambda: 60000)
        assert free_port() == 23456
    finally:
        busy.close()
