"""Regenerate the figures in docs/benchmarks.md and docs/benchmarks.png.

Runs ``kvstore bench`` against each server named (default: null, moto, seaweedfs) with 8 MiB
objects and 16 in flight, then rewrites the part of docs/benchmarks.md between the
``<!-- bench:start -->`` and ``<!-- bench:end -->`` markers and redraws the plot.
``--from-json`` renders saved ``kvstore bench --json`` files instead of running.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

from kvstore.bench import report
from kvstore.bench.runner import Result
from kvstore.cli.bench_cmd import bench

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "benchmarks.png"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def section(runs: list[dict]) -> str:
    first = runs[0]
    parts = [
        f"Generated {datetime.date.today().isoformat()} on {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}: {first['count']} objects of {first['size'] >> 20} MiB per op per round, "
        f"{first['concurrency']} requests in flight, median of {first['rounds']} rounds after a warm-up.",
        "",
        "![GET and PUT throughput per client](benchmarks.png)",
    ]
    for run in runs:
        results = [Result(**r) for r in run["results"]]
        parts += ["", f"### {run['endpoint_label']}", "",
                  report.markdown_table(("limit", "GiB/s"), report.limit_rows(run["limits"])), "",
                  report.markdown_table(report.HEADERS, report.rows(results, run.get("cores", 0)))]
        parts += [f"- {line}" for line in report.notes(results)]
        checks = report.targets(results, run["limits"], run["server"] == "null")  # today's targets, even for old runs
        parts += ["", report.markdown_table(("target", "measured", "want", "verdict"), report.target_rows(checks))]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="null,moto,seaweedfs")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--from-json", nargs="+", metavar="FILE", help="render these saved runs instead")
    args = parser.parse_args(argv)
    if args.from_json:
        runs = [json.loads(Path(p).read_text()) for p in args.from_json]
    else:
        runs = []
        for server in [s for s in args.servers.split(",") if s]:
            print(f"benchmarking against {server} ...", file=sys.stderr, flush=True)
            runs.append(bench(url=None, extra={}, server=server, size=8 << 20, count=args.count, concurrency=16,
                              ops=["put", "get", "get_into", "exists"], backends=["crt", "obstore", "fsspec"],
                              baselines=["awscrt", "obstore", "boto3", "s3fs", "lmcache"], rounds=args.rounds))
    text = DOC.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{START}\n{section(runs)}\n{END}{tail}")
    report.plot(runs, str(PLOT))
    print(f"wrote {DOC.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
