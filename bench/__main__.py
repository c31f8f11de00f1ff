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
              "notifications", "pipeline")


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
    report = {"date": stamp, "machine": machine(), "results": results, "failures": failures}
    (RESULTS / f"{stamp}.json").write_text(json.dumps(report, indent=2, default=str))
    (RESULTS / f"{stamp}.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if failures else 0


def markdown(report: dict) -> str:
    lines = [f"# omnicrm benchmarks, {report['date']}", "",
             f"Machine: `{json.dumps(report['machine'])}`", "",
             "Every number comes from this one run on this machine; ratios compare with ceilings measured in it.", ""]
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
