"""A circuit breaker: after repeated connection failures, fail fast, then probe to recover.

Unlike LMCache's, it is never open for good: after ``breaker_reset_s`` one call goes through
(half-open); success closes it, failure opens it for another period.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from kvstore.errors import StoreTimeout, StoreUnavailable
from kvstore.layers.base import Layer

if TYPE_CHECKING:
    from kvstore.backends.base import Backend
    from kvstore.config import StoreConfig
    from kvstore.layers.metrics import Registry

T = TypeVar("T")


class BreakerLayer(Layer):
    def __init__(self, inner: Backend, config: StoreConfig, metrics: Registry) -> None:
        super().__init__(inner, config)
        self.metrics = metrics
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        metrics.gauge("breaker_state", lambda: self.state)

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            if time.monotonic() - self._opened_at >= self.config.breaker_reset_s:
                return "half-open"
            return "open"

    def around(self, op: str, call: Callable[[], T], nbytes: int = 0) -> T:
        self._admit()
        try:
            result = call()
        except BaseException as exc:
            self._failed(op, exc)
            raise
        self._close()
        return result

    async def aaround(self, op: str, call: Callable[[], Awaitable[T]], nbytes: int = 0) -> T:
        self._admit()
        try:
            result = await call()
        except BaseException as exc:
            self._failed(op, exc)
            raise
        self._close()
        return result

    def _admit(self) -> None:
        """Let a call through, or fail it fast while the circuit is open (one probe when half-open)."""
        with self._lock:
            if self._opened_at is not None:
                waited = time.monotonic() - self._opened_at
                if waited < self.config.breaker_reset_s or self._probing:
                    raise StoreUnavailable(
                        f"circuit open after {self._failures} connection failures; retrying in "
                        f"{max(0.0, self.config.breaker_reset_s - waited):.1f} s", retryable=False, connection=True)
                self._probing = True

    def _failed(self, op: str, exc: BaseException) -> None:
        if not isinstance(exc, (StoreUnavailable, StoreTimeout)):
            # Any other answer (a 403, a bad key) still proves the endpoint is reachable.
            self._close()
            return
        # Retries that ran out on 503s end in StoreTimeout too: only a lost connection counts.
        cause = exc if isinstance(exc, StoreUnavailable) else exc.__cause__
        connection = getattr(cause, "connection", True)
        with self._lock:
            self._probing = False
            if connection:
                self._failures += 1
                if self._failures >= self.config.breaker_threshold or self._opened_at is not None:
                    if self._opened_at is None:
                        self.metrics.count("breaker_opened", op)
                    self._opened_at = time.monotonic()

    def _close(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._probing = False
