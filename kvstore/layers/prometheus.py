"""Export ``KVStore.metrics()`` to Prometheus (optional: needs ``prometheus_client``).

    from prometheus_client import REGISTRY
    from kvstore.layers.prometheus import StoreCollector
    REGISTRY.register(StoreCollector(store, name="lmcache-l2"))

Every scrape reads a fresh snapshot, so nothing is double-counted and nothing needs updating.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kvstore.errors import BackendUnavailable

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.registry import Collector
except ImportError:  # pragma: no cover - exercised only without the extra
    raise BackendUnavailable("prometheus export", "prometheus_client", "prometheus") from None

# snapshot counter name -> (metric suffix, help)
_COUNTERS = {
    "calls": ("operations", "Operations completed or failed, as the caller saw them."),
    "retries": ("retries", "Attempts repeated after a transient failure."),
    "misses": ("misses", "Reads and stats of keys that were not there."),
    "breaker_opened": ("breaker_opened", "Times the circuit breaker opened."),
}
BREAKER_STATES = ("closed", "open", "half-open")


class StoreCollector(Collector):
    """A Prometheus collector for one store; ``name`` becomes the ``store`` label."""

    def __init__(self, store: Any, name: str = "default", namespace: str = "kvstore") -> None:
        self.store = store
        self.name = name
        self.namespace = namespace

    def describe(self) -> list[Any]:
        # Families depend on which operations ran; an empty description keeps registration lazy.
        return []

    def collect(self) -> Iterator[Any]:
        snapshot = self.store.metrics()
        ops: dict[str, dict[str, Any]] = snapshot.get("operations", {})
        ns, store = self.namespace, self.name
        for key, (suffix, text) in _COUNTERS.items():
            family = CounterMetricFamily(f"{ns}_{suffix}", text, labels=["store", "op"])
            for op, values in sorted(ops.items()):
                if key in values:
                    family.add_metric([store, op], values[key])
            yield family
        errors = CounterMetricFamily(f"{ns}_errors", "Failed operations by error class.", labels=["store", "op", "error"])
        transferred = CounterMetricFamily(f"{ns}_bytes", "Object bytes moved.", labels=["store", "op", "direction"])
        latency = HistogramMetricFamily(f"{ns}_operation_seconds", "Operation latency, retries included.",
                                        labels=["store", "op"])
        for op, values in sorted(ops.items()):
            for key, value in values.items():
                if key.startswith("errors."):
                    errors.add_metric([store, op, key[len("errors."):]], value)
            for key, direction in (("bytes_in", "in"), ("bytes_out", "out")):
                if key in values:
                    transferred.add_metric([store, op, direction], values[key])
            if "latency_buckets" in values:
                cumulative, buckets = 0, []
                for bound, count in values["latency_buckets"].items():
                    cumulative += count
                    buckets.append(("+Inf" if bound == "inf" else bound, cumulative))
                latency.add_metric([store, op], buckets, values["latency_sum_s"])
        yield errors
        yield transferred
        yield latency
        if "breaker_state" in snapshot:
            state = GaugeMetricFamily(f"{ns}_breaker_state", "1 for the circuit breaker's current state.",
                                      labels=["store", "state"])
            for name in BREAKER_STATES:
                state.add_metric([store, name], 1.0 if snapshot["breaker_state"] == name else 0.0)
            yield state
