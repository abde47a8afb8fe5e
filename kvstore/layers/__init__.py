"""Cross-cutting behaviour written once, as layers around any backend (OpenDAL's idea).

``wrap`` stacks them in a fixed order, outermost first::

    Metrics -> Breaker -> Retry (owns the deadline) -> Integrity -> backend

Metrics see every call as the caller does (retries included in its latency); the breaker
refuses work before any retry is spent; the deadline covers every attempt; integrity checks
each attempt's bytes so that a torn read is retried rather than returned.
"""

from __future__ import annotations

from kvstore.backends.base import Backend
from kvstore.config import StoreConfig
from kvstore.layers.base import Layer
from kvstore.layers.breaker import BreakerLayer
from kvstore.layers.integrity import IntegrityLayer
from kvstore.layers.metrics import MetricsLayer
from kvstore.layers.retry import RetryLayer


def wrap(backend: Backend, config: StoreConfig) -> Backend:
    """The backend inside every layer the configuration asks for."""
    metrics = MetricsLayer.new_registry()
    layered: Backend = IntegrityLayer(backend, config)
    layered = RetryLayer(layered, config, metrics)
    if config.breaker_threshold > 0:
        layered = BreakerLayer(layered, config, metrics)
    return MetricsLayer(layered, config, metrics)


__all__ = ["Layer", "wrap"]
