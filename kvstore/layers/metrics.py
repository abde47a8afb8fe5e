"""Counters and latency histograms per operation; ``KVStore.metrics()`` returns a snapshot."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from kvstore.backends.base import Backend, ReadResult
from kvstore.layers.base import Layer

if TYPE_CHECKING:
    from kvstore.config import StoreConfig

T = TypeVar("T")
# Upper bounds of the latency buckets, seconds (Prometheus-style, cumulative on export).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))


class Registry:
    """Thread-safe counters, histograms and gauges."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, str], int] = defaultdict(int)
        self.histograms: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.gauges: dict[str, Callable[[], Any]] = {}

    def count(self, name: str, op: str, n: int = 1) -> None:
        with self._lock:
            self.counters[(name, op)] += n

    def observe(self, op: str, seconds: float) -> None:
        index = next(i for i, bound in enumerate(BUCKETS) if seconds <= bound)
        with self._lock:
            self.histograms[op][index] += 1
            self.latency_sum[op] += seconds

    def gauge(self, name: str, read: Callable[[], Any]) -> None:
        self.gauges[name] = read

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            ops: dict[str, dict[str, Any]] = defaultdict(dict)
            for (name, op), value in self.counters.items():
                ops[op][name] = value
            for op, counts in self.histograms.items():
                ops[op]["latency_buckets"] = dict(zip([str(b) for b in BUCKETS], counts))
                ops[op]["latency_sum_s"] = self.latency_sum[op]
        return {"operations": dict(ops), **{name: read() for name, read in self.gauges.items()}}


class MetricsLayer(Layer):
    def __init__(self, inner: Backend, config: StoreConfig, registry: Registry) -> None:
        super().__init__(inner, config)
        self.registry = registry

    @staticmethod
    def new_registry() -> Registry:
        return Registry()

    def snapshot(self) -> dict[str, Any]:
        return self.registry.snapshot()

    def around(self, op: str, call: Callable[[], T], nbytes: int = 0) -> T:
        start = time.perf_counter()
        try:
            result = call()
        except Exception as exc:
            self._failed(op, exc)
            raise
        finally:
            self._timed(op, start)
        return self._counted(op, result, nbytes)

    async def aaround(self, op: str, call: Callable[[], Awaitable[T]], nbytes: int = 0) -> T:
        start = time.perf_counter()
        try:
            result = await call()
        except Exception as exc:
            self._failed(op, exc)
            raise
        finally:
            self._timed(op, start)
        return self._counted(op, result, nbytes)

    def _failed(self, op: str, exc: Exception) -> None:
        self.registry.count("errors", op)
        self.registry.count(f"errors.{type(exc).__name__}", op)

    def _timed(self, op: str, start: float) -> None:
        self.registry.observe(op, time.perf_counter() - start)
        self.registry.count("calls", op)

    def _counted(self, op: str, result: T, nbytes: int) -> T:
        if op == "put":
            self.registry.count("bytes_out", op, nbytes)
        elif op == "get_into" and result is not None:
            self.registry.count("bytes_in", op, cast(ReadResult, result).size)
        elif op == "get" and result is not None:
            self.registry.count("bytes_in", op, cast("tuple[Any, ReadResult]", result)[1].size)
        elif op in ("head", "get", "get_into") and result is None:
            self.registry.count("misses", op)
        return result


def find_metrics(backend: Backend) -> MetricsLayer | None:
    while isinstance(backend, Layer):
        if isinstance(backend, MetricsLayer):
            return backend
        backend = backend.inner
    return None
