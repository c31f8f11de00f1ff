"""A faust-streaming no-op agent counting records of one topic: the framework's own ceiling.

Run by bench.ceilings as a subprocess: BENCH_BOOTSTRAP, BENCH_TOPIC, BENCH_N; prints one JSON line
{"records": n, "per_s": rate, "join_s": seconds until the first record} and exits.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

import faust


def main() -> None:
    bootstrap, topic_name, n = os.environ["BENCH_BOOTSTRAP"], os.environ["BENCH_TOPIC"], int(os.environ["BENCH_N"])
    app = faust.App(f"bench-noop-{uuid.uuid4().hex[:6]}", broker=f"kafka://{bootstrap}", value_serializer="raw",
                    topic_allow_declare=False, topic_disable_leader=True, web_enabled=False,
                    store="memory://", consumer_auto_offset_reset="earliest", producer_acks=1)
    topic = app.topic(topic_name, value_type=bytes, value_serializer="raw")
    started = time.perf_counter()
    state = {"seen": 0, "first": None}

    @app.agent(topic)
    async def noop(stream):
        async for _ in stream:
            if state["first"] is None:
                state["first"] = time.perf_counter()
            state["seen"] += 1
            if state["seen"] >= n:
                elapsed = time.perf_counter() - state["first"]
                print(json.dumps({"records": n, "per_s": round(n / elapsed),
                                  "join_s": round(state["first"] - started, 2)}), flush=True)
                os._exit(0)

    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
    app.main()


if __name__ == "__main__":
    main()
