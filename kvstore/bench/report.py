"""Turns a benchmark run into a table, JSON, a Markdown section, the target checks and a plot."""

from __future__ import annotations

from typing import Any

from kvstore.bench.runner import GIB, Result

HEADERS = ("contender", "op", "GiB/s", "of TCP", "ops/s", "p50 ms", "p99 ms", "CPU s/GiB", "server CPU s/GiB", "host CPU busy",
           "RSS +MiB", "threads", "x best raw")


def host_cpu_busy(r: Result, cores: int) -> float | None:
    """The share of the host's CPUs that client and server together used while ``r`` ran.

    Near 1.0 the op was CPU-bound on this host: it cannot go faster here without costing less CPU.
    """
    if r.server_cpu_s_per_gib is None or r.op == "exists" or not cores:
        return None
    return r.gib_per_s * (r.cpu_s_per_gib + r.server_cpu_s_per_gib) / cores


def share_of_tcp(r: Result, tcp: float | None) -> float | None:
    """``r``'s throughput as a share of ``tcp``, the loopback TCP bytes/s measured with as many streams in the same run."""
    return r.gib_per_s * GIB / tcp if r.op != "exists" and tcp else None


def rows(results: list[Result], cores: int, tcp: float | None = None) -> list[list[str]]:
    """One row per (contender, op) that ran; see ``notes`` for those that did not.

    "of TCP" is ``share_of_tcp``: the most any client could move here is 100%.
    """
    out = []
    for r in sorted(results, key=lambda r: (r.op, r.family != "kvstore", r.contender)):
        if r.status != "ok":
            out.append([r.contender, r.op, "n/a"] + [""] * (len(HEADERS) - 3))
            continue
        moves = r.op != "exists"
        busy, share = host_cpu_busy(r, cores), share_of_tcp(r, tcp)
        out.append([
            r.contender, r.op, f"{r.gib_per_s:.2f}" if moves else "-",
            f"{share:.0%}" if share is not None else "-", f"{r.ops_per_s:.0f}", f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}", f"{r.cpu_s_per_gib:.2f}" if moves else "-",
            f"{r.server_cpu_s_per_gib:.2f}" if moves and r.server_cpu_s_per_gib is not None else "-",
            f"{busy:.0%}" if busy is not None else "-", f"{r.rss_growth_mib:.0f}", str(r.threads),
            f"{r.ratio_to_best_raw:.2f}" if r.ratio_to_best_raw is not None else "",
        ])
    return out


def notes(results: list[Result]) -> list[str]:
    """Why a contender has no figures: one line per contender and reason (naming the ops unless all failed)."""
    all_ops = {r.op for r in results}
    failed: dict[tuple[str, str], list[str]] = {}
    for r in results:
        if r.status != "ok":
            failed.setdefault((r.contender, r.status), []).append(r.op)
    return [f"{who}{'' if set(ops) == all_ops else ' ' + ','.join(ops)}: {status}" for (who, status), ops in failed.items()]


def _find(results: list[Result], contender: str, op: str) -> Result | None:
    """The result for ``op``; for "read", the faster of the contender's ``get`` and ``get_into``."""
    ops = ("get", "get_into") if op == "read" else (op,)
    found = [r for r in results if r.contender == contender and r.op in ops and r.status == "ok"]
    return max(found, key=lambda r: r.ops_per_s, default=None)


def targets(results: list[Result], limits: dict[str, float], null_endpoint: bool) -> list[dict[str, Any]]:
    """The project's throughput and CPU targets, each with the measured ratio and whether it holds.

    GET compares each client's faster read path (``get`` or ``get_into``), PUT its ``put``.
    """
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, want: float, at_most: bool = False) -> None:
        met = None if value is None else (value <= want if at_most else value >= want)
        checks.append({"target": name, "value": None if value is None else round(value, 3), "want": want, "met": met})

    def speed(a: Result | None, b: Result | None) -> float | None:
        return a.ops_per_s / b.ops_per_s if a and b else None

    def cpu(a: Result | None, b: Result | None) -> float | None:
        return a.cpu_s_per_gib / b.cpu_s_per_gib if a and b and b.cpu_s_per_gib else None

    names = sorted({r.contender for r in results})
    for op, label in (("read", "GET"), ("put", "PUT")):
        crt = _find(results, "kvstore-crt", op)
        check(f"kvstore-crt / awscrt, {label}", speed(crt, _find(results, "awscrt", op)), 1.0)
        check(f"kvstore-crt / LMCache S3Connector, {label}", speed(crt, _find(results, "lmcache", op)), 1.5)
    kvstore_reads = [_find(results, n, "read") for n in names if n.startswith("kvstore-")]
    best_kv = max((r for r in kvstore_reads if r), key=lambda r: r.ops_per_s, default=None)
    check("best kvstore / boto3, GET", speed(best_kv, _find(results, "boto3", "read")), 2.0)
    check("best kvstore / obstore, GET", speed(best_kv, _find(results, "obstore", "read")), 1.0)
    raw_names = [r.contender for r in results if r.family == "raw"]
    for op, label in (("read", "GET"), ("put", "PUT")):
        raw = [x for x in (_find(results, n, op) for n in set(raw_names)) if x]
        best_cpu = min(raw, key=lambda r: r.cpu_s_per_gib, default=None)
        check(f"kvstore-crt CPU/GiB / best raw client's, {label}", cpu(_find(results, "kvstore-crt", op), best_cpu), 1.1, at_most=True)
    # Through the asyncio API, as LMCache reads: against the fastest raw client and LMCache's connector.
    crt_async = _find(results, "kvstore-crt-async", "read")
    raw_reads = [x for x in (_find(results, n, "read") for n in set(raw_names) if n != "lmcache") if x]
    fastest = max(raw_reads, key=lambda r: r.ops_per_s, default=None)
    cheapest = min(raw_reads, key=lambda r: r.cpu_s_per_gib, default=None)
    check("kvstore-crt-async / fastest raw client, GET", speed(crt_async, fastest), 1.0)
    check("kvstore-crt-async / LMCache S3Connector, GET", speed(crt_async, _find(results, "lmcache", "read")), 1.2)
    check("kvstore-crt-async CPU/GiB / cheapest raw client's, GET", cpu(crt_async, cheapest), 1.1, at_most=True)
    if null_endpoint:
        crt, tcp = _find(results, "kvstore-crt", "read"), limits.get("tcp_concurrent")
        check("kvstore-crt GET / loopback TCP (C streams)", crt.gib_per_s * GIB / tcp if crt and tcp else None, 0.5)
    return checks


def limit_rows(limits: dict[str, float]) -> list[list[str]]:
    names = {"tcp_one_stream": "loopback TCP, 1 stream", "tcp_concurrent": "loopback TCP, C streams", "memcpy": "memcpy (numpy, 256 MiB)"}
    return [[names.get(k, k), f"{v / GIB:.2f}"] for k, v in limits.items()]


def target_rows(checks: list[dict[str, Any]]) -> list[list[str]]:
    verdict = {True: "met", False: "NOT met", None: "not measured"}
    return [[c["target"], "" if c["value"] is None else f"{c['value']:.2f}",
             ("<= " if "CPU" in c["target"] else ">= ") + f"{c['want']}", verdict[c["met"]]] for c in checks]


def markdown_table(headers: tuple[str, ...] | list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in body]
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: str) -> None:
    """A grouped bar chart: GiB/s per contender for GET and PUT, one panel per endpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), squeeze=False)
    for ax, run in zip(axes[0], runs):
        results = [r for r in run["results"] if r["status"] == "ok"]
        names = list(dict.fromkeys(r["contender"] for r in run["results"]))
        for k, (ops, label) in enumerate(((("get", "get_into"), "GET (faster of get, get_into)"), (("put",), "PUT"))):
            values = [max((r["gib_per_s"] for r in results if r["contender"] == n and r["op"] in ops), default=0.0)
                      for n in names]
            ax.bar([i + (k - 0.5) * 0.4 for i in range(len(names))], values, width=0.4, label=label)
        tcp = run["limits"].get("tcp_concurrent")
        if tcp:
            ax.axhline(tcp / GIB, color="grey", linestyle="--", linewidth=1, label="loopback TCP, C streams")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right")
        ax.set_ylabel("GiB/s (median round)")
        ax.set_title(run["endpoint_label"], fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"{runs[0]['size'] >> 20} MiB objects, {runs[0]['concurrency']} in flight")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
