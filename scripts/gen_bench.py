"""Regenerate the figures in docs/benchmarks.md and docs/benchmarks.png.

Runs ``kvstore bench`` against each server named (default: null, moto, seaweedfs) with 8 MiB
objects and 16 in flight, then rewrites the part of docs/benchmarks.md between the
``<!-- bench:start -->`` and ``<!-- bench:end -->`` markers and redraws the plot.
``--from-json`` renders saved ``kvstore bench --json`` files instead of running.

``--defaults`` instead sweeps the settings whose defaults matter for KV chunks (part size
against object size, requests in flight, CRT event loops) for kvstore's crt and obstore backends against the
null endpoint, and rewrites the ``<!-- defaults:start -->`` ... ``<!-- defaults:end -->`` part.
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
DEFAULTS_START, DEFAULTS_END = "<!-- defaults:start -->", "<!-- defaults:end -->"
MiB = 1 << 20
SWEEP_BACKENDS = ["crt", "obstore"]
SWEEP_OPS = ["put", "get_into"]


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
                  report.markdown_table(report.HEADERS, report.rows(results, run.get("cores", 0),
                                                                     run["limits"].get("tcp_concurrent")))]
        parts += [f"- {line}" for line in report.notes(results)]
        checks = report.targets(results, run["limits"], run["server"] == "null")  # today's targets, even for old runs
        parts += ["", report.markdown_table(("target", "measured", "want", "verdict"), report.target_rows(checks))]
    return "\n".join(parts)


def _sweep_run(size: int, concurrency: int, extra: dict, rounds: int,
               backends: list[str] = SWEEP_BACKENDS) -> dict[tuple[str, str], float]:
    """GiB/s per (backend, op) for one setting, at least 256 MiB moved per op per round."""
    count = max(2 * concurrency if size <= 8 * MiB else concurrency, 256 * MiB // size)
    data = bench(url=None, extra=extra, server="null", size=size, count=count, concurrency=concurrency,
                 ops=SWEEP_OPS, backends=backends, baselines=[], rounds=rounds)
    return {(r["contender"].removeprefix("kvstore-"), r["op"]): r["gib_per_s"] for r in data["results"]
            if r["status"] == "ok"}


def _figure(got: dict[tuple[str, str], float], cell: tuple[str, str]) -> str:
    return f"{got[cell]:.2f}" if cell in got else "n/a"


def defaults_section(rounds: int) -> str:
    columns = [f"{b} {op}" for b in SWEEP_BACKENDS for op in SWEEP_OPS]
    head = ["Generated " + datetime.date.today().isoformat() + " against the null endpoint; GiB/s, median of "
            f"{rounds} rounds after a warm-up. Each row is its own run, so compare within a column.", ""]
    part_rows = []
    for size in (1 * MiB, 8 * MiB, 64 * MiB):
        for part in (8 * MiB, 16 * MiB, 32 * MiB):
            print(f"  object {size // MiB} MiB, part {part // MiB} MiB", file=sys.stderr, flush=True)
            got = _sweep_run(size, 16, {"s3_part_size": part}, rounds)
            part_rows.append([f"{size // MiB} MiB", f"{part // MiB} MiB"]
                             + [_figure(got, tuple(c.split())) for c in columns])
    flight_rows = []
    for inflight in (4, 8, 16, 32, 64):
        print(f"  {inflight} in flight", file=sys.stderr, flush=True)
        got = _sweep_run(8 * MiB, inflight, {}, rounds)
        flight_rows.append([str(inflight)] + [_figure(got, tuple(c.split())) for c in columns])
    loop_rows = []
    for loops in (1, 2, 4, 8, 16):
        print(f"  {loops} CRT event loops", file=sys.stderr, flush=True)
        got = _sweep_run(8 * MiB, 16, {"s3_num_io_threads": loops}, rounds, ["crt"])
        loop_rows.append([str(loops)] + [_figure(got, ("crt", op)) for op in SWEEP_OPS])
    return "\n".join(head + [
        "**Part size** (`s3_part_size`), 16 requests in flight:", "",
        report.markdown_table(["object", "part size", *columns], part_rows), "",
        "**Requests in flight** (`kvstore_max_inflight`, with as many callers), 8 MiB objects:", "",
        report.markdown_table(["in flight", *columns], flight_rows), "",
        "**CRT event-loop threads** (`s3_num_io_threads`), 8 MiB objects, 16 in flight:", "",
        report.markdown_table(["event loops", *(f"crt {op}" for op in SWEEP_OPS)], loop_rows)])


def _replace_between(text: str, start: str, end: str, body: str) -> str:
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n{body}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="null,moto,seaweedfs")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--from-json", nargs="+", metavar="FILE", help="render these saved runs instead")
    parser.add_argument("--defaults", action="store_true", help="run the defaults sweep instead")
    args = parser.parse_args(argv)
    if args.defaults:
        DOC.write_text(_replace_between(DOC.read_text(), DEFAULTS_START, DEFAULTS_END, defaults_section(args.rounds)))
        print(f"wrote the defaults sweep into {DOC.relative_to(ROOT)}", file=sys.stderr)
        return 0
    if args.from_json:
        runs = [json.loads(Path(p).read_text()) for p in args.from_json]
    else:
        runs = []
        for server in [s for s in args.servers.split(",") if s]:
            print(f"benchmarking against {server} ...", file=sys.stderr, flush=True)
            runs.append(bench(url=None, extra={}, server=server, size=8 << 20, count=args.count, concurrency=16,
                              ops=["put", "get", "get_into", "exists"], backends=["crt", "obstore", "fsspec"],
                              baselines=["awscrt", "obstore", "boto3", "s3fs", "lmcache"], rounds=args.rounds))
    DOC.write_text(_replace_between(DOC.read_text(), START, END, section(runs)))
    report.plot(runs, str(PLOT))
    print(f"wrote {DOC.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
