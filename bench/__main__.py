"""`make bench`: run every benchmark in its own process, then write bench/results/<date>.md and .json.

Each benchmark saves bench/results/<name>.json next to the ceilings it measured in the same run;
this report gathers the ones written during this run. `python -m bench name ...` runs a subset.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time

from bench.environment import RESULTS, ROOT, machine

# In order: ceilings first, then one worker per service, then the whole pipeline.
BENCHMARKS = ("ceilings", "batch_consumer", "ingestion", "identity", "loyalty", "triggers_scan",
              "notifications", "scaling", "pipeline")


def main(argv: list[str]) -> int:
    wanted = argv or list(BENCHMARKS)
    started = time.time()
    failures: dict[str, str] = {}
    for name in wanted:
        if not (ROOT / "bench" / f"{name}.py").exists():
            failures[name] = "not present"
            continue
        print(f"== {name}", flush=True)
        proc = subprocess.run([sys.executable, "-m", f"bench.{name}"], cwd=ROOT, timeout=1800)
        if proc.returncode != 0:
            failures[name] = f"exit code {proc.returncode}"
    results = {}
    for name in wanted:
        path = RESULTS / f"{name}.json"
        if path.exists() and path.stat().st_mtime >= started:
            results[name] = json.loads(path.read_text())
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    report = {"date": stamp, "machine": machine(), **summary(results), "results": results, "failures": failures}
    (RESULTS / f"{stamp}.json").write_text(json.dumps(report, indent=2, default=str))
    (RESULTS / f"{stamp}.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if failures else 0


def _get(results: dict, path: str):
    value = results
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def summary(results: dict) -> dict:
    """The comparable core of a run (issue 11's shape): end to end, per service, ceilings."""
    consume = _get(results, "ceilings.kafka_consume_per_s")
    produce = _get(results, "ceilings.kafka_produce_per_s")
    rss = _get(results, "pipeline.peak_rss_mb") or {}
    steady = _get(results, "pipeline.steady_1000_per_s") or {}

    def ms(key: str):
        return round(steady[key] * 1000) if key in steady else None

    copy = _get(results, "ceilings.pg_copy_rows_per_s")
    # The ceiling of a consuming service's work: read the event with a plain consumer and write
    # one row for it with COPY, in series (1 / (1/read + 1/copy)).
    work = 1 / (1 / consume + 1 / copy) if consume and copy else None
    per_service = {
        "ingestion": (_get(results, "ingestion.batch_1000.accepted_per_s"), _get(results, "ingestion.producer_ceiling_per_s")),
        "identity": (_get(results, "identity.resolved_events_per_s"), work),
        "loyalty": (_get(results, "loyalty.loyalty_events_per_s_one_worker"), work),
        "triggers": (_get(results, "triggers_scan.handler.events_per_second"), work),
        "notifications": (_get(results, "notifications.decisions_per_s_one_worker"), work),
    }
    faust = _get(results, "ceilings.faust_noop_agent.per_s")
    return {
        "end_to_end": {"events_per_s": _get(results, "pipeline.sustained.end_to_end_per_s"),
                       "p50_ms_at_1000_per_s": ms("latency_p50_s"), "p95_ms_at_1000_per_s": ms("latency_p95_s"),
                       "p99_ms_at_1000_per_s": ms("latency_p99_s")},
        "services": {name: {"events_per_s": rate, "ceiling_per_s": round(ceiling) if ceiling else None,
                            "ratio_to_ceiling": round(rate / ceiling, 3) if rate and ceiling else None,
                            "peak_rss_mb": rss.get(name)}
                     for name, (rate, ceiling) in per_service.items()},
        "ceilings": {"kafka_consume_per_s": consume, "kafka_produce_per_s": produce,
                     "postgres_copy_rows_per_s": _get(results, "ceilings.pg_copy_rows_per_s"),
                     "faust_noop_per_s": faust},
    }


def markdown(report: dict) -> str:
    lines = [f"# omnicrm benchmarks, {report['date']}", "",
             f"Machine: `{json.dumps(report['machine'])}`", "",
             "Every number comes from this one run on this machine; ratios compare with ceilings measured in it.", "",
             "## summary", "", "```json", json.dumps({k: report[k] for k in ("end_to_end", "services", "ceilings")},
                                                     indent=2), "```", ""]
    for name, result in report["results"].items():
        lines += [f"## {name}", "", "| measure | value |", "|---|---|"]
        for key, value in _flatten(result):
            lines.append(f"| {key} | {value} |")
        lines.append("")
    if report["failures"]:
        lines += ["## not measured", ""] + [f"- {n}: {why}" for n, why in report["failures"].items()]
    return "\n".join(lines) + "\n"


def _flatten(value, prefix: str = ""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}{k}." if not isinstance(v, dict) else f"{prefix}{k}.")
    elif prefix:
        yield prefix.rstrip("."), value


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
