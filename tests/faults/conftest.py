"""Fault fixtures: a broker reached only through a fault-injecting TCP proxy."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from shared.stack import Broker, free_port
from tests.conftest import ROOT
from tests.support.tcp_proxy import TcpProxy


@dataclass
class ProxiedBroker:
    bootstrap: str  # the proxy's address, which the broker also advertises
    proxy: TcpProxy


@pytest.fixture(scope="session")
def proxied_broker() -> Iterator[ProxiedBroker]:
    broker_port, proxy_port = free_port(), free_port()
    log_dir = ROOT / ".omnicrm" / "test-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    broker = Broker(port=broker_port, advertised=f"127.0.0.1:{proxy_port}",
                    log_path=log_dir / "proxied-broker.log").start()
    proxy = TcpProxy(proxy_port, "127.0.0.1", broker_port).start()
    try:
        yield ProxiedBroker(f"127.0.0.1:{proxy_port}", proxy)
    finally:
        proxy.stop()
        broker.stop()
