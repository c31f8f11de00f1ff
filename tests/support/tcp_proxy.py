"""A fault-injecting TCP proxy (asyncio, in its own thread) to put between the services and the broker.

Modes: pass through, add latency per chunk, stall (hold bytes without closing), and drop every
open connection at once. The broker is started advertising the proxy's address, so clients follow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class TcpProxy:
    """Listens on 127.0.0.1:`port` and forwards to `target_host:target_port`."""

    def __init__(self, port: int, target_host: str, target_port: int) -> None:
        self.port = port
        self.target = (target_host, target_port)
        self.latency = 0.0
        self._stalled = asyncio.Event()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self.connections = 0

    # -- control, from the test thread ---------------------------------------------------
    def start(self) -> TcpProxy:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def stop(self) -> None:
        self._call(self._shutdown)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def set_latency(self, seconds: float) -> None:
        self.latency = seconds

    def stall(self, on: bool = True) -> None:
        """While stalled, bytes are held (connections stay open): clients see a silent broker."""
        self._loop.call_soon_threadsafe(self._stalled.set if on else self._stalled.clear)

    def drop_all(self) -> None:
        """Close every open connection, as a network blip or broker restart would."""
        self._call(self._drop)

    # -- the loop ------------------------------------------------------------------------
    def _call(self, coro_fn) -> None:
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._started.set()
        self._loop.run_forever()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._drop()

    async def _drop(self) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, up_writer})
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                             return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            with contextlib.suppress(Exception):
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            while self._stalled.is_set():
                await asyncio.sleep(0.05)
            if self.latency:
                await asyncio.sleep(self.latency)
            writer.write(chunk)
            await writer.drain()
        with contextlib.suppress(Exception):
            writer.transport.abort()
