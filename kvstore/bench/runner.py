"""Runs every contender against one endpoint, interleaved: 1 warm-up round, then R rounds in rotated order.

For each (contender, op) a round times ``count`` operations with ``concurrency`` in flight and
records throughput, per-operation latencies, client CPU (``time.process_time``), the server's
CPU (from /proc, when the server runs here) and the process's peak RSS while the op ran. The
result keeps the median round.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvstore.bench.contenders import Contender

OPS = ("put", "get", "get_into", "exists")
GIB = 1 << 30
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Sample:
    """One (contender, op) in one round."""

    seconds: float
    cpu_seconds: float
    server_cpu_seconds: float | None  # None when the server is not a process on this host
    rss_growth: int  # peak resident set size during the op, above what it was when the op began
    latencies: list[float]
    threads: int = 0  # the most OS threads the process had while the op ran


@dataclass
class Result:
    """One (contender, op) over every round: medians, and latency percentiles over all operations."""

    contender: str
    family: str
    op: str
    status: str = "ok"  # or "unavailable: why" / "error: what"
    gib_per_s: float = 0.0
    ops_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_s_per_gib: float = 0.0
    server_cpu_s_per_gib: float | None = None
    rss_growth_mib: float = 0.0
    threads: int = 0  # peak OS threads of the process during the op, over the rounds
    ratio_to_best_raw: float | None = None
    samples: list[Sample] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("samples")
        return data


def process_cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds these processes (and the children they reaped) have used so far."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                after_name = f.read().rpartition(")")[2].split()
        except OSError:  # the process is gone: it no longer adds anything
            continue
        ticks += sum(int(x) for x in after_name[11:15])  # utime, stime, cutime, cstime (stat fields 14-17)
    return ticks / os.sysconf("SC_CLK_TCK")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def os_threads() -> int:
    """OS threads of this process (Python's and the native libraries' alike)."""
    return len(os.listdir("/proc/self/task"))


class PeakRss:
    """The highest resident set size seen while it runs (sampled every 5 ms), and where it started.

    Unlike tracemalloc it sees native allocations too (Rust, C, the CRT's buffer pool).
    """

    def __init__(self) -> None:
        self.start = self.peak = _rss()
        self.threads = os_threads()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())
            self.threads = max(self.threads, os_threads() - 1)  # less this sampler

    @property
    def growth(self) -> int:
        return self.peak - self.start

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _drive(contender: Contender, op: str, count: int, concurrency: int, buffers: list[bytearray]) -> list[float]:
    """Run ``op`` on objects 0..count-1 with ``concurrency`` in flight; per-operation latencies in seconds."""
    fn = contender.operation(op)
    moves_bytes = op in ("get", "get_into")
    latencies: list[float] = []
    lock = threading.Lock()
    items = iter(range(count))

    if contender.asynchronous:
        async def worker(buffer: bytearray) -> None:
            for i in items:
                start = time.perf_counter()
                got = await fn(i, buffer)
                latencies.append(time.perf_counter() - start)
                _check(contender, op, i, got, moves_bytes)

        async def everything() -> None:
            await asyncio.gather(*(worker(b) for b in buffers[:concurrency]))

        contender.run_on_loop(everything())
        return latencies

    errors: list[BaseException] = []

    def thread(buffer: bytearray) -> None:
        try:
            while True:
                with lock:
                    i = next(items, None)
                if i is None:
                    return
                start = time.perf_counter()
                got = fn(i, buffer)
                latencies.append(time.perf_counter() - start)
                _check(contender, op, i, got, moves_bytes)
        except BaseException as exc:  # surfaced below, on the driving thread
            errors.append(exc)

    threads = [threading.Thread(target=thread, args=(b,)) for b in buffers[:concurrency]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return latencies


def _check(contender: Contender, op: str, i: int, got: Any, moves_bytes: bool) -> None:
    """A read must return the whole object and ``exists`` must find it: a fast wrong answer is no result."""
    if moves_bytes and got != contender.size:
        raise RuntimeError(f"{op} of object {i} returned {got} bytes, expected {contender.size}")
    if op == "exists" and got is not True:
        raise RuntimeError(f"exists of object {i} returned {got!r} after it was put")


def _measure(contender: Contender, op: str, count: int, concurrency: int, buffers: list[bytearray],
             server_pids: Callable[[], Sequence[int]] | None) -> Sample:
    pids = list(server_pids()) if server_pids else []
    server_cpu_before = process_cpu_seconds(pids)
    cpu = time.process_time()
    with PeakRss() as rss:
        start = time.perf_counter()
        latencies = _drive(contender, op, count, concurrency, buffers)
        seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    server_cpu = max(0.0, process_cpu_seconds(pids) - server_cpu_before) if pids else None
    return Sample(seconds, cpu, server_cpu, rss.growth, latencies, rss.threads)


def _summarise(result: Result, size: int, count: int) -> None:
    if not result.samples:
        return
    by_speed = sorted(result.samples, key=lambda s: s.seconds)
    median = by_speed[len(by_speed) // 2]
    result.ops_per_s = count / median.seconds
    moved = size * count / GIB
    result.gib_per_s = moved / median.seconds if result.op != "exists" else 0.0
    if result.op != "exists":
        result.cpu_s_per_gib = statistics.median(s.cpu_seconds for s in result.samples) / moved
        server_cpu = [s.server_cpu_seconds for s in result.samples if s.server_cpu_seconds is not None]
        if len(server_cpu) == len(result.samples):  # every round measured the server
            result.server_cpu_s_per_gib = statistics.median(server_cpu) / moved
    every = sorted(x for s in result.samples for x in s.latencies)
    result.p50_ms = 1000 * every[len(every) // 2]
    result.p99_ms = 1000 * every[min(len(every) - 1, int(len(every) * 0.99))]
    result.rss_growth_mib = max(s.rss_growth for s in result.samples) / (1 << 20)
    result.threads = max(s.threads for s in result.samples)


def _ratios(results: list[Result], raw_clients: tuple[str, ...]) -> None:
    for op in OPS:
        raw = [r.ops_per_s for r in results if r.op == op and r.contender in raw_clients and r.status == "ok"]
        if not raw:
            continue
        best = max(raw)
        for r in results:
            if r.op == op and r.status == "ok":
                r.ratio_to_best_raw = r.ops_per_s / best


def run(contenders: list[Contender], ops: list[str], *, count: int, concurrency: int, rounds: int,
        raw_clients: tuple[str, ...], log: Any = None,
        server_pids: Callable[[], Sequence[int]] | None = None) -> list[Result]:
    """Open every contender, run the rounds, and summarise; contenders that fail are reported, not raised.

    ``server_pids`` names the server's processes when they run on this host, so that their CPU
    time is charged to the op that caused it.
    """
    size = contenders[0].size if contenders else 0
    ops = [op for op in OPS if op in ops]  # reads and exists need the objects a put writes first
    results = {(c.name, op): Result(c.name, c.family, op) for c in contenders for op in ops}
    live: list[Contender] = []
    for c in contenders:
        try:
            c.open()
            live.append(c)
        except Exception as exc:  # a client that cannot run here is a row, not a crash
            for op in ops:
                results[(c.name, op)].status = f"unavailable: {_reason(exc)}"
    buffers = [bytearray(size) for _ in range(concurrency)]
    try:
        if "put" not in ops:
            _seed(live, ops, results, count, concurrency, buffers)
        for round_no in range(rounds + 1):
            order = live[round_no % len(live):] + live[:round_no % len(live)] if live else []
            for c in order:
                for op in ops:
                    result = results[(c.name, op)]
                    if result.status != "ok":
                        continue
                    try:
                        sample = _measure(c, op, count, concurrency, buffers, server_pids)
                    except Exception as exc:
                        result.status = f"error: {_reason(exc)}"
                        continue
                    if round_no > 0:  # round 0 warms connections, caches and allocators
                        result.samples.append(sample)
                    if log:
                        log(f"round {round_no}/{rounds} {c.name} {op}: {size * count / GIB / sample.seconds:.2f} GiB/s")
    finally:
        for c in live:
            try:
                c.close()
            except Exception:
                pass
    out = list(results.values())
    for r in out:
        _summarise(r, size, count)
    _ratios(out, raw_clients)
    return out


def _seed(live: list[Contender], ops: list[str], results: dict, count: int, concurrency: int,
          buffers: list[bytearray]) -> None:
    """Write every contender's objects, unmeasured, for a run that reads without putting."""
    for c in live:
        try:
            _drive(c, "put", count, concurrency, buffers)
        except Exception as exc:
            for op in ops:
                results[(c.name, op)].status = f"error: could not write the objects to read: {_reason(exc)}"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:160] if text else type(exc).__name__
