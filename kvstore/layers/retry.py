"""Retries with exponential backoff and full jitter, inside one deadline per operation."""

from __future__ import annotations

import random
import time
from typing import Callable, TypeVar

from kvstore.errors import IntegrityError, StoreTimeout, StoreUnavailable
from kvstore.layers.base import Layer

T = TypeVar("T")
BASE_DELAY_S = 0.05
MAX_DELAY_S = 2.0
# A put is retried too: it replaces the whole object, so repeating it is harmless.
IDEMPOTENT = {"put", "get", "get_into", "head", "delete", "delete_many", "list"}


class RetryLayer(Layer):
    def __init__(self, inner, config, metrics) -> None:
        super().__init__(inner, config)
        self.metrics = metrics

    def around(self, op: str, call: Callable[[], T], nbytes: int = 0) -> T:
        deadline = time.monotonic() + self.config.timeout_s
        attempt = 0
        while True:
            try:
                return call()
            except StoreUnavailable as exc:
                if not exc.retryable or op not in IDEMPOTENT or attempt >= self.config.max_retries:
                    raise
                delay = random.uniform(0, min(MAX_DELAY_S, BASE_DELAY_S * 2**attempt))
                if time.monotonic() + delay >= deadline:
                    raise StoreTimeout(f"{op} gave up after {attempt + 1} attempts within "
                                       f"{self.config.timeout_s:g} s: {exc}") from exc
                attempt += 1
                self.metrics.count("retries", op)
                time.sleep(delay)
            except StoreTimeout:
                if time.monotonic() >= deadline or attempt >= self.config.max_retries or op not in IDEMPOTENT:
                    raise
                attempt += 1
                self.metrics.count("retries", op)
            except IntegrityError:
                # A body torn in transit reads differently next time; a corrupt object fails every time.
                if op not in ("get", "get_into") or attempt >= self.config.max_retries or time.monotonic() >= deadline:
                    raise
                attempt += 1
                self.metrics.count("retries", op)
