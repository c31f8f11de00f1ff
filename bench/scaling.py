"""Scale-out: throughput of ingestion -> identity -> loyalty with 1, 2 and 4 partitions and workers.

For each n: a fresh broker and database, every topic created with n partitions, n worker processes
of ingestion (its raw-topic consumer), identity and loyalty in their consumer groups, then N sales
of new customers produced straight to `ingest.raw.v1` (shared.publish.publish_kafka). The rate is N
over the time until loyalty has consumed them all, read from /metrics of every worker; the time
each stage finished and the CPU seconds each service spent are kept too, so a flat curve can be
told apart from a saturated machine. Triggers and notifications are not started: they are not on
the path measured and would only take CPU from it. The plain aiokafka read of the same raw topic
in the same run is the ceiling. Run: python -m bench.scaling [N] [workers...].
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import sys
import time
import uuid

import httpx
import psutil

from bench.environment import ROOT, bench_environment, plain_consume_rate, save
from bench.pipeline import sale
from shared.kafka import ensure_topics
from shared.publish import publish_kafka
from tests.support.pipeline import Pipeline

UTC = dt.UTC
# service -> the topic whose consumed counter says the stage has seen every sale
STAGES = {"ingestion": "ingest.raw.v1", "identity": "ingest.sales.v1", "loyalty": "identity.events.v1"}
_COUNTER = re.compile(r'^omnicrm_(\w+?)_events_consumed_total\{topic="([^"]+)"\} ([0-9.e+]+)$', re.M)


class Workers:
    """The worker processes of each stage and the consumed counters summed over them."""

    def __init__(self, p: Pipeline, n: int) -> None:
        self.p = p
        self.keys = {s: [s] + [p.start_worker(s, i) for i in range(1, n)] for s in STAGES}

    async def consumed(self, http: httpx.AsyncClient) -> dict[str, dict[str, int]]:
        """Per service, per worker: records consumed of the stage's topic."""
        out: dict[str, dict[str, int]] = {}
        for service, keys in self.keys.items():
            out[service] = {}
            for key in keys:
                text = (await http.get(f"{self.p.url(key)}/metrics")).text
                out[service][key] = sum(int(float(v)) for svc, topic, v in _COUNTER.findall(text)
                                        if svc == service and topic == STAGES[service])
        return out

    def cpu_seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for service, keys in self.keys.items():
            total = 0.0
            for key in keys:
                try:
                    t = psutil.Process(self.p.procs[key].pid).cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
            out[service] = total
        return out


async def warm_up(workers: Workers, http: httpx.AsyncClient, bootstrap: str, timeout: float = 180) -> int:
    """Publish small batches until every worker of every stage has consumed something: the groups
    have settled (all members joined, partitions spread) before the clock starts. Returns sales sent."""
    sent = 0
    deadline = time.perf_counter() + timeout
    tag = uuid.uuid4().hex[:6]
    while True:
        now = dt.datetime.now(UTC)
        await publish_kafka([sale(f"w{tag}", sent + i, now) for i in range(200)], bootstrap)
        sent += 200
        await asyncio.sleep(1.0)
        counts = await workers.consumed(http)
        if all(v > 0 for per in counts.values() for v in per.values()):
            # let the last batch drain so the measured run starts from an empty pipeline
            while sum(counts["loyalty"].values()) < sent:
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"warm-up: loyalty at {sum(counts['loyalty'].values())} of {sent}")
                await asyncio.sleep(0.2)
                counts = await workers.consumed(http)
            return sent
        if time.perf_counter() > deadline:
            raise TimeoutError(f"warm-up: some worker never got a partition: {counts}")


async def measure(workers: Workers, bootstrap: str, events: int, timeout: float = 300) -> dict:
    async with httpx.AsyncClient(timeout=10) as http:
        warm = await warm_up(workers, http, bootstrap)
        base = {s: sum(v.values()) for s, v in (await workers.consumed(http)).items()}
        cpu0, machine0 = workers.cpu_seconds(), psutil.cpu_times()
        tag = uuid.uuid4().hex[:6]
        now = dt.datetime.now(UTC)
        started = time.perf_counter()
        published: list[float] = []
        publisher = asyncio.create_task(publish_kafka((sale(tag, i, now) for i in range(events)), bootstrap))
        publisher.add_done_callback(lambda _: published.append(time.perf_counter() - started))
        done: dict[str, float] = {}
        per_worker: dict[str, dict[str, int]] = {}
        while len(done) < len(STAGES):
            await asyncio.sleep(0.1)
            counts = await workers.consumed(http)
            elapsed = time.perf_counter() - started
            for service, per in counts.items():
                if service not in done and sum(per.values()) - base[service] >= events:
                    done[service] = elapsed
                    per_worker[service] = dict(per)
            if elapsed > timeout:
                raise TimeoutError(f"not drained in {timeout:.0f}s: {counts} (base {base})")
        await publisher
        publish_s = published[0]
        cpu1, machine1 = workers.cpu_seconds(), psutil.cpu_times()
    wall = done["loyalty"]
    busy = (sum(machine1) - machine1.idle - (sum(machine0) - machine0.idle))
    total = (sum(machine1) - sum(machine0)) or 1.0
    plain = await plain_consume_rate(bootstrap, STAGES["ingestion"], warm + events)
    return {
        "events_per_s": round(events / wall),
        "seconds": round(wall, 2),
        "stage_done_s": {s: round(t, 2) for s, t in done.items()},
        "stage_events_per_s": {s: round(events / t) for s, t in done.items()},
        "publish_per_s_while_processing": round(events / publish_s),
        "cpu_seconds": {s: round(cpu1[s] - cpu0[s], 1) for s in STAGES},
        "cpu_us_per_event": {s: round((cpu1[s] - cpu0[s]) / events * 1e6) for s in STAGES},
        "machine_cpu_busy": round(busy / total, 2),
        "records_per_worker": per_worker,
        "kafka_consume_per_s": round(plain),
        "ratio_to_plain_consumer": round(events / wall / plain, 3),
    }


def run_one(n: int, events: int) -> dict:
    with bench_environment() as env:
        asyncio.run(ensure_topics(env.bootstrap, n))
        p = Pipeline(env.bootstrap, env.dsn, ROOT / ".omnicrm" / "bench-logs" / f"scaling-{n}",
                     env={"OMNICRM_PARTITIONS": str(n), "OMNICRM_LOG_LEVEL": "warning"})
        try:
            p.start(*STAGES)
            workers = Workers(p, n)
            p.wait_ready(*[k for keys in workers.keys.values() for k in keys], timeout=180)
            return asyncio.run(measure(workers, env.bootstrap, events))
        finally:
            p.stop()


def main() -> None:
    events = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    counts = [int(a) for a in sys.argv[2:]] or [1, 2, 4]
    runs: dict[str, dict] = {}
    for n in counts:
        print(f"-- {n} partition(s) and worker(s) per service", flush=True)
        runs[str(n)] = run_one(n, events)
        print(json.dumps(runs[str(n)], indent=2), flush=True)
    first = runs[str(counts[0])]["events_per_s"]
    result = {
        "events": events,
        "path": "ingest.raw.v1 -> ingestion -> identity -> loyalty",
        "cpus": psutil.cpu_count(),
        "events_per_s": {k: r["events_per_s"] for k, r in runs.items()},
        "speedup": {k: round(r["events_per_s"] / first, 2) for k, r in runs.items()},
        "kafka_consume_per_s": {k: r["kafka_consume_per_s"] for k, r in runs.items()},
        "runs": runs,
    }
    print(json.dumps({k: result[k] for k in ("events_per_s", "speedup", "kafka_consume_per_s")}, indent=2))
    print(f"saved {save('scaling', result)}")


if __name__ == "__main__":
    main()
