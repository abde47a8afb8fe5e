"""``kvstore bench``: every client against one endpoint, in one run, next to the machine's own limits."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

from kvstore.cli.common import add_store_arguments, print_table, url_and_config

BENCH_BUCKET = "kvstore-bench"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="compare kvstore's backends with raw S3 clients on one endpoint")
    add_store_arguments(p, url=False)
    p.add_argument("url", nargs="?", help="store URL (omit with --server)")
    p.add_argument("--server", choices=("moto", "seaweedfs", "ceph", "null"),
                   help="start this server for the run (null: discards PUTs, serves GETs from memory)")
    p.add_argument("--size", default="8MiB", help="object size (default 8MiB)")
    p.add_argument("--count", type=int, default=32, help="objects per op per round (default 32)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight, for every client (default 16)")
    p.add_argument("--ops", default="put,get,get_into,exists", help="comma-separated ops")
    p.add_argument("--backends", default=None,
                   help="kvstore backends ('' for none; default: every installed backend that serves S3)")
    p.add_argument("--baselines", default="awscrt,obstore,boto3,s3fs,lmcache", help="raw clients ('' for none)")
    p.add_argument("--api", default="sync,async",
                   help="kvstore's APIs to drive: sync (blocking calls on threads), async (awaited on one event "
                        "loop, as LMCache does) or both (default)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up (default 3)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-' for stdout only)")
    p.add_argument("--quiet", action="store_true", help="no per-round progress on stderr")
    p.set_defaults(handler=cmd_bench)


def _s3_backends() -> str:
    from kvstore import plugins

    s3 = set(plugins.S3_PROFILES)
    return ",".join(b.name for b in plugins.by_priority() if s3 & set(b.serves))


@contextlib.contextmanager
def endpoint(server: str | None, url: str | None, extra: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str, Any]]:
    """(url, extra_config, label, server PIDs or None) of the endpoint: a server started for the run, or the one given."""
    from kvstore.errors import ConfigError

    if server is None:
        if not url:
            raise ConfigError("give a store URL or --server")
        yield url, extra, url, None
        return
    if server == "null":
        from kvstore.bench.null_endpoint import NullEndpoint

        with NullEndpoint() as null:
            yield null.url(BENCH_BUCKET, "bench"), null.extra_config() | extra, null.label, lambda: null.pids
        return
    from kvstore.testing import servers

    reason = servers.available(server)
    if reason:
        raise ConfigError(f"cannot start {server}: {reason}")
    with servers.start(server) as managed:
        s3 = managed.server
        assert s3 is not None, f"{server} started without an endpoint"  # servers.start returns it up
        s3.create_bucket(BENCH_BUCKET)
        yield s3.url(BENCH_BUCKET, "bench"), s3.extra_config() | extra, f"{server} (own process)", lambda: managed.pids


def bench(*, url: str | None, extra: dict[str, Any], server: str | None, size: int, count: int, concurrency: int,
          ops: list[str], backends: list[str], baselines: list[str], rounds: int, log: Any = None,
          apis: tuple[str, ...] = ("sync", "async")) -> dict[str, Any]:
    """Run the whole comparison and return it as plain data (what ``--json`` writes)."""
    from kvstore.bench import contenders as cts
    from kvstore.bench import limits, report, runner
    from kvstore.errors import ConfigError

    unknown = set(ops) - set(runner.OPS)
    if unknown:
        raise ConfigError(f"unknown ops {sorted(unknown)}; choose from {', '.join(runner.OPS)}")
    if size <= 0 or count <= 0 or concurrency <= 0 or rounds <= 0:
        raise ConfigError("--size, --count, --concurrency and --rounds must be positive")
    with endpoint(server, url, extra) as (store_url, store_extra, label, server_pids):
        target = cts.Target.resolve(store_url, store_extra)
        machine = limits.measure(concurrency)
        chosen = cts.build(backends, baselines, target, size, concurrency, apis)
        results = runner.run(chosen, ops, count=count, concurrency=concurrency, rounds=rounds,
                             raw_clients=cts.RAW_CLIENTS, log=log, server_pids=server_pids)
    fractions: dict[str, float] = {}
    for r in results:
        # None for exists, and when the loopback TCP limit measured nothing: no fraction to give
        share = report.share_of_tcp(r, machine["tcp_concurrent"]) if r.status == "ok" else None
        if share is not None:
            fractions[f"{r.contender} {r.op}"] = round(share, 3)
    return {
        "endpoint_label": label, "server": server, "size": size, "count": count, "concurrency": concurrency,
        "rounds": rounds, "limits": machine, "cores": limits.cores(),
        "results": [r.as_dict() for r in results],
        "fraction_of_limits": fractions,
        "targets": report.targets(results, machine, server == "null"),
    }


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def cmd_bench(args: argparse.Namespace) -> int:
    from kvstore.bench import report
    from kvstore.bench.runner import Result
    from kvstore.config.keys import parse_size

    url, extra = url_and_config(args)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    data = bench(url=url, extra=extra, server=args.server, size=parse_size(args.size), count=args.count,
                 concurrency=args.concurrency, ops=_names(args.ops), backends=_names(_s3_backends() if args.backends is None else args.backends),
                 baselines=_names(args.baselines), rounds=args.rounds, log=log, apis=tuple(_names(args.api)))
    if args.json and args.json != "-":
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
    if args.json == "-":
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"endpoint: {data['endpoint_label']}; {data['count']} x {data['size'] >> 20} MiB, "
          f"{data['concurrency']} in flight, median of {data['rounds']} rounds after a warm-up")
    print_table(("limit", "GiB/s"), report.limit_rows(data["limits"]))
    print()
    results = [Result(**{k: v for k, v in r.items()}) for r in data["results"]]
    print_table(report.HEADERS, report.rows(results, data["cores"], data["limits"].get("tcp_concurrent")))
    for line in report.notes(results):
        print(f"  {line}")
    print()
    print_table(("target", "measured", "want", "verdict"), report.target_rows(data["targets"]))
    return 0
