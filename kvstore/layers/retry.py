"""Retries with exponential backoff and full jitter, inside one deadline per operation."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from kvstore.backends import call as calls
from kvstore.backends.base import ObjectInfo
from kvstore.errors import IntegrityError, PreconditionFailed, StoreTimeout, StoreUnavailable
from kvstore.layers.base import Layer, close_pages

if TYPE_CHECKING:
    from kvstore.backends.base import Backend
    from kvstore.config import StoreConfig
    from kvstore.layers.metrics import Registry

T = TypeVar("T")
BASE_DELAY_S = 0.05
MAX_DELAY_S = 2.0
# A put is retried too: it replaces the whole object, so repeating it is harmless.
IDEMPOTENT = {"put", "get", "get_into", "head", "delete", "delete_many", "discard_many", "list"}


class RetryLayer(Layer):
    def __init__(self, inner: Backend, config: StoreConfig, metrics: Registry) -> None:
        super().__init__(inner, config)
        self.metrics = metrics

    def around(self, op: str, call: Callable[[], T], nbytes: int = 0) -> T:
        # One deadline per operation: the store's call when there is one (it started the clock),
        # else one opened here. Backends size each attempt from what is left of it.
        current = calls.current()
        with contextlib.ExitStack() as stack:
            if current is None:
                current = stack.enter_context(calls.running(calls.Call(self.config.timeout_s)))
            return self._attempts(op, call, current)

    def _attempts(self, op: str, call: Callable[[], T], current: calls.Call) -> T:
        attempt = 0
        while True:
            if attempt and current.remaining() <= 0:
                raise StoreTimeout(f"{op}: no answer within {self.config.timeout_s:g} s ({attempt} attempts)")
            try:
                return call()
            except StoreUnavailable as exc:
                if not exc.retryable or op not in IDEMPOTENT or attempt >= self.config.max_retries:
                    raise
                delay = random.uniform(0, min(MAX_DELAY_S, BASE_DELAY_S * 2**attempt))
                if current.remaining() - delay <= 0:
                    raise StoreTimeout(f"{op} gave up after {attempt + 1} attempts within "
                                       f"{self.config.timeout_s:g} s: {exc}") from exc
                attempt += 1
                self.metrics.count("retries", op)
                time.sleep(delay)
            except StoreTimeout:
                if current.remaining() <= 0 or attempt >= self.config.max_retries or op not in IDEMPOTENT:
                    raise
                attempt += 1
                self.metrics.count("retries", op)
            except IntegrityError:
                # A body torn in transit reads differently next time; a corrupt object fails every time.
                if op not in ("get", "get_into") or attempt >= self.config.max_retries or current.remaining() <= 0:
                    raise
                attempt += 1
                self.metrics.count("retries", op)

    def list_pages(self, prefix: str, start_after: str | None = None) -> Iterator[Sequence[ObjectInfo]]:
        """Pages as below, a failed page retried by listing again after the last name seen.

        A generator that raised is finished, so a retry starts a new listing where the last
        delivered page ended: one page is asked for again, never the whole listing.
        """
        last = start_after
        pages: Iterator[Sequence[ObjectInfo]] | None = None

        def next_page() -> Sequence[ObjectInfo] | None:
            nonlocal pages
            if pages is None:
                pages = iter(self.inner.list_pages(prefix, last))
            try:
                return next(pages, None)
            except BaseException:
                pages = None
                raise

        try:
            while True:
                page = self.around("list", next_page)
                if page is None:
                    return
                if page:
                    last = page[-1].key
                yield page
        finally:
            close_pages(pages)

    def put(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        if not if_absent:
            return super().put(name, data, metadata)

        def attempt() -> None:
            try:
                self.inner.put(name, data, metadata, if_absent=True)
            except PreconditionFailed:
                # After a lost answer the object there may be our own earlier attempt, resent by
                # us or unseen by the HTTP client itself (aiohttp repeats a PUT whose reused
                # connection dropped). Only a different object is a conflict, or the writer that
                # stored it would be told it lost; an identical one cannot be told from our own.
                if self._holds(name, data, metadata):
                    return
                raise

        return self.around("put", attempt, len(data))

    def _holds(self, name: str, data: memoryview, metadata: Mapping[str, str]) -> bool:
        """Whether ``name`` holds exactly ``data`` with ``metadata``, read through the layers below."""
        try:
            info = self.inner.head(name)
            if info is None or info.size != len(data):
                return False
            found = self.inner.get(name)
        except (StoreUnavailable, StoreTimeout, IntegrityError):
            return False
        if found is None:
            return False
        stored, result = found
        return bytes(stored) == bytes(data) and all(result.metadata.get(k) == v for k, v in metadata.items())
