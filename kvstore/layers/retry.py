"""Retries with exponential backoff and full jitter, inside one deadline per operation.

What to do after a failure (raise, or wait how long and try again) is decided once, in
``_after``; the blocking and the asyncio paths are two short loops around it that differ only
in how they wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from kvstore.backends import call as calls
from kvstore.backends.base import ObjectInfo, ReadResult
from kvstore.errors import IntegrityError, PreconditionFailed, StoreTimeout, StoreUnavailable
from kvstore.layers.base import Layer, aclose_pages, close_pages

if TYPE_CHECKING:
    from kvstore.backends.base import Backend
    from kvstore.config import StoreConfig
    from kvstore.layers.metrics import Registry

T = TypeVar("T")
BASE_DELAY_S = 0.05
MAX_DELAY_S = 2.0
# A put is retried too: it replaces the whole object, so repeating it is harmless.
IDEMPOTENT = {"put", "get", "get_into", "head", "delete", "delete_many", "discard_many", "list"}
_RETRIED = (StoreUnavailable, StoreTimeout, IntegrityError)


class RetryLayer(Layer):
    def __init__(self, inner: Backend, config: StoreConfig, metrics: Registry) -> None:
        super().__init__(inner, config)
        self.metrics = metrics

    # One deadline per operation: the store's call when there is one (it started the clock), else
    # one opened here. Backends size each attempt from what is left of it.
    def around(self, op: str, call: Callable[[], T], nbytes: int = 0) -> T:
        with contextlib.ExitStack() as stack:
            current = calls.current() or stack.enter_context(calls.running(calls.Call(self.config.timeout_s)))
            attempt = 0
            while True:
                self._check_deadline(op, attempt, current)
                try:
                    return call()
                except _RETRIED as exc:
                    delay = self._after(op, exc, attempt, current)
                attempt += 1
                if delay:
                    time.sleep(delay)

    async def aaround(self, op: str, call: Callable[[], Awaitable[T]], nbytes: int = 0) -> T:
        with contextlib.ExitStack() as stack:
            current = calls.current() or stack.enter_context(calls.running(calls.Call(self.config.timeout_s)))
            attempt = 0
            while True:
                self._check_deadline(op, attempt, current)
                try:
                    return await call()
                except _RETRIED as exc:
                    delay = self._after(op, exc, attempt, current)
                attempt += 1
                if delay:
                    await asyncio.sleep(delay)

    def _check_deadline(self, op: str, attempt: int, current: calls.Call) -> None:
        if attempt and current.remaining() <= 0:
            raise StoreTimeout(f"{op}: no answer within {self.config.timeout_s:g} s ({attempt} attempts)")

    def _after(self, op: str, exc: Exception, attempt: int, current: calls.Call) -> float:
        """The seconds to wait before attempt ``attempt + 1`` of ``op`` after ``exc``; raises when it is not retried."""
        if isinstance(exc, StoreUnavailable):
            if not exc.retryable or op not in IDEMPOTENT or attempt >= self.config.max_retries:
                raise exc
            delay = random.uniform(0, min(MAX_DELAY_S, BASE_DELAY_S * 2**attempt))
            if current.remaining() - delay <= 0:
                raise StoreTimeout(f"{op} gave up after {attempt + 1} attempts within "
                                   f"{self.config.timeout_s:g} s: {exc}") from exc
        elif isinstance(exc, StoreTimeout):
            if current.remaining() <= 0 or attempt >= self.config.max_retries or op not in IDEMPOTENT:
                raise exc
            delay = 0.0
        else:
            # A body torn in transit reads differently next time; a corrupt object fails every time.
            if op not in ("get", "get_into") or attempt >= self.config.max_retries or current.remaining() <= 0:
                raise exc
            delay = 0.0
        self.metrics.count("retries", op)
        return delay

    # -- listings: a failed page is retried by listing again after the last name seen -----------
    # A generator that raised is finished, so a retry starts a new listing where the last
    # delivered page ended: one page is asked for again, never the whole listing.
    def list_pages(self, prefix: str, start_after: str | None = None) -> Iterator[Sequence[ObjectInfo]]:
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
            while (page := self.around("list", next_page)) is not None:
                if page:
                    last = page[-1].key
                yield page
        finally:
            close_pages(pages)

    async def alist_pages(self, prefix: str, start_after: str | None = None) -> AsyncIterator[Sequence[ObjectInfo]]:
        last = start_after
        pages: AsyncIterator[Sequence[ObjectInfo]] | None = None

        async def next_page() -> Sequence[ObjectInfo] | None:
            nonlocal pages
            if pages is None:
                pages = aiter(self.inner.alist_pages(prefix, last))
            try:
                return await anext(pages, None)
            except BaseException:
                pages = None
                raise

        try:
            while (page := await self.aaround("list", next_page)) is not None:
                if page:
                    last = page[-1].key
                yield page
        finally:
            await aclose_pages(pages)

    # -- conditional puts ----------------------------------------------------------------------
    # After a lost answer the object there may be our own earlier attempt, resent by us or unseen
    # by the HTTP client itself (aiohttp repeats a PUT whose reused connection dropped). Only a
    # different object is a conflict, or the writer that stored it would be told it lost; an
    # identical one cannot be told from our own.
    def put(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        if not if_absent:
            return super().put(name, data, metadata)

        def attempt() -> None:
            try:
                self.inner.put(name, data, metadata, if_absent=True)
            except PreconditionFailed:
                try:
                    info = self.inner.head(name)
                    found = self.inner.get(name) if _may_hold(info, data) else None
                except _RETRIED:  # unreadable: taken as someone else's, the PreconditionFailed stands
                    found = None
                if not _holds(found, data, metadata):
                    raise

        return self.around("put", attempt, len(data))

    async def aput(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        if not if_absent:
            return await super().aput(name, data, metadata)

        async def attempt() -> None:
            try:
                await self.inner.aput(name, data, metadata, if_absent=True)
            except PreconditionFailed:
                try:
                    info = await self.inner.ahead(name)
                    found = await self.inner.aget(name) if _may_hold(info, data) else None
                except _RETRIED:  # unreadable: taken as someone else's, the PreconditionFailed stands
                    found = None
                if not _holds(found, data, metadata):
                    raise

        return await self.aaround("put", attempt, len(data))


def _may_hold(info: ObjectInfo | None, data: memoryview) -> bool:
    return info is not None and info.size == len(data)


def _holds(found: tuple[bytes | bytearray | memoryview, ReadResult] | None, data: memoryview,
           metadata: Mapping[str, str]) -> bool:
    """Whether what was read back is exactly ``data`` with ``metadata``."""
    if found is None:
        return False
    stored, result = found
    return bytes(stored) == bytes(data) and all(result.metadata.get(k) == v for k, v in metadata.items())
