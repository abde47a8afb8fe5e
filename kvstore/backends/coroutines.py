"""Backends written as coroutines, and the two bridges between blocking code and an event loop.

``AsyncBackend`` is the base of a backend whose client is asynchronous (futures completed by
the client's own threads, or a coroutine API): it implements the ``a*`` coroutines, which
``KVStore``'s asyncio API awaits on the caller's loop with no thread in between, and inherits
the blocking methods, which run the same coroutines on one event-loop thread the backend owns
(started on the first blocking call). A backend that blocks (the file store) implements the
blocking methods instead and ``Backend`` runs them on a bounded pool for asyncio callers.

* ``run_bounded`` runs a coroutine on a loop thread from a blocking caller, within what is left
  of the call's deadline, and cancels it (so nothing keeps running or writing) when the
  deadline passes or the caller's buffer lease is revoked.
* ``future_result`` awaits a ``concurrent.futures.Future`` completed by a client's own threads,
  without ever cancelling it (the client completes its futures itself) and without a complaint when
  the loop has gone by the time it completes.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from kvstore.backends import call
from kvstore.backends.base import AGAIN, GET_RESIZES, Backend, ObjectInfo, OnChunk, ReadResult, aclose_pages, sized_read
from kvstore.errors import BufferTooSmall, KVStoreError, StoreTimeout, StoreUnavailable

T = TypeVar("T")
# How long a timed-out or abandoned call waits for its coroutine to wind down (close its
# connection) before it returns anyway: the coroutine is cancelled, so it writes nothing more.
CANCEL_GRACE_S = 0.5


class LoopThread:
    """An event loop on a daemon thread of its own, for blocking callers of coroutines."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Cancel what still runs on the loop and stop it. Idempotent."""
        if self.loop.is_closed() or not self._thread.is_alive():
            return

        def stop() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.call_later(0.05, self.loop.stop)

        self.loop.call_soon_threadsafe(stop)
        self._thread.join(2)


def run_bounded(loop: asyncio.AbstractEventLoop, coro: Awaitable[T], what: str, timeout_s: float) -> T:
    """Run ``coro`` on ``loop`` within what is left of the current call's deadline.

    At the deadline it raises ``StoreTimeout``; when the caller's buffer lease is revoked
    (cancel, ``wait_for`` timeout, ``close()``) it raises ``CallAbandoned``. Either way the
    coroutine is cancelled first, and given ``CANCEL_GRACE_S`` to end, so no request of ours
    goes on in the background. The coroutine's own exceptions come through unchanged. The
    coroutine runs in a copy of the caller's context, so it sees the same ``call.current()``.
    """
    budget = call.remaining(timeout_s)
    ended = threading.Event()
    if loop.is_closed() or asyncio_running_loop() is loop:
        if hasattr(coro, "close"):
            coro.close()
        if loop.is_closed():
            raise KVStoreError(f"{what}: the store is closed")
        # Waiting here would stop the very loop the coroutine needs until the deadline.
        raise KVStoreError(f"{what}: a blocking call from the backend's own event loop; await the coroutine instead")

    async def guarded() -> T:
        try:
            return await coro
        finally:
            ended.set()

    future = asyncio.run_coroutine_threadsafe(guarded(), loop)
    lease = call.lease()
    if lease is not None:
        lease.on_revoke(future.cancel)
    try:
        return future.result(timeout=budget)
    except (TimeoutError, concurrent.futures.TimeoutError) as exc:  # distinct classes before 3.11
        if future.done() and not future.cancelled():
            return future.result()  # it ended just now, or raised a timeout of its own (a socket read)
        future.cancel()
        ended.wait(CANCEL_GRACE_S)
        raise StoreTimeout(f"{what}: no answer within the deadline ({timeout_s:g} s)") from exc
    except concurrent.futures.CancelledError as exc:
        ended.wait(CANCEL_GRACE_S)
        raise call.CallAbandoned(f"{what}: the call was abandoned") from exc


def asyncio_running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any (None rather than an error)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def future_result(future: concurrent.futures.Future[T]) -> asyncio.Future[T]:
    """An asyncio future on the running loop that follows ``future``.

    Unlike ``asyncio.wrap_future``, cancelling the returned future never cancels ``future``
    (its owner completes it, and would find it cancelled), and a loop closed before ``future``
    completes is left alone rather than raising in the owner's thread.
    """
    loop = asyncio.get_running_loop()
    mirror: asyncio.Future[T] = loop.create_future()

    def settle(done: concurrent.futures.Future[T]) -> None:
        if mirror.done():
            return
        exc = done.exception() if not done.cancelled() else concurrent.futures.CancelledError()
        if exc is not None:
            mirror.set_exception(exc)
        else:
            mirror.set_result(done.result())

    def hand_over(done: concurrent.futures.Future[T]) -> None:
        try:
            loop.call_soon_threadsafe(settle, done)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    future.add_done_callback(hand_over)
    return mirror


class AsyncBackend(Backend):
    """A backend implemented as coroutines; its blocking methods run them on a loop thread of its own."""

    blocking = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._loop_thread: LoopThread | None = None
        self._loop_lock = threading.Lock()
        self._loop_closed = False

    @abc.abstractmethod
    async def aput(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        """The coroutine of ``put``."""

    @abc.abstractmethod
    async def aget_into(self, name: str, buffer: memoryview, on_chunk: OnChunk | None = None) -> ReadResult | None:
        """The coroutine of ``get_into``."""

    @abc.abstractmethod
    async def ahead(self, name: str) -> ObjectInfo | None:
        """The coroutine of ``head``."""

    @abc.abstractmethod
    async def adelete_many(self, names: list[str]) -> list[bool]:
        """The coroutine of ``delete_many``."""

    @abc.abstractmethod
    def alist_pages(self, prefix: str, start_after: str | None = None) -> AsyncIterator[Sequence[ObjectInfo]]:
        """The async iterator of ``list_pages``."""

    async def aget(self, name: str) -> tuple[bytes | bytearray | memoryview, ReadResult] | None:
        """The whole object: a HEAD for the size, then a read, sized again if it changed meanwhile."""
        for attempt in range(GET_RESIZES):
            info = await self.ahead(name)
            if info is None:
                return None
            buffer = bytearray(info.size)
            try:
                result = await self.aget_into(name, memoryview(buffer))
            except BufferTooSmall:
                if attempt == GET_RESIZES - 1:
                    raise
                continue
            outcome = sized_read(attempt, info.size, buffer, result)
            if outcome is not AGAIN:
                return outcome
        raise AssertionError("unreachable")  # pragma: no cover

    async def adelete(self, name: str) -> bool:
        return (await self.adelete_many([name]))[0]

    async def adiscard_many(self, names: list[str]) -> None:
        await self.adelete_many(names)

    # -- the blocking mirrors ----------------------------------------------------------------
    def _blocking(self, what: str, coro: Coroutine[Any, Any, T]) -> T:
        try:
            loop = self._loop()
        except KVStoreError:
            coro.close()  # never awaited: say so quietly rather than with a RuntimeWarning
            raise
        return run_bounded(loop, coro, what, self.config.timeout_s)

    def _loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop_closed:
                raise StoreUnavailable("the backend is closed", retryable=False)
            if self._loop_thread is None:
                self._loop_thread = LoopThread(f"kvstore-{type(self).__name__}")
            return self._loop_thread.loop

    def put(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        self._blocking(f"put {name!r}", self.aput(name, data, metadata, if_absent=if_absent))

    def get_into(self, name: str, buffer: memoryview, on_chunk: OnChunk | None = None) -> ReadResult | None:
        return self._blocking(f"get {name!r}", self.aget_into(name, buffer, on_chunk))

    def get(self, name: str) -> tuple[bytes | bytearray | memoryview, ReadResult] | None:
        return self._blocking(f"get {name!r}", self.aget(name))

    def head(self, name: str) -> ObjectInfo | None:
        return self._blocking(f"head {name!r}", self.ahead(name))

    def delete(self, name: str) -> bool:
        return self._blocking(f"delete {name!r}", self.adelete(name))

    def delete_many(self, names: list[str]) -> list[bool]:
        return self._blocking(f"delete_many ({len(names)} objects)", self.adelete_many(names))

    def discard_many(self, names: list[str]) -> None:
        self._blocking(f"discard_many ({len(names)} objects)", self.adiscard_many(names))

    def list_pages(self, prefix: str, start_after: str | None = None) -> Iterator[Sequence[ObjectInfo]]:
        loop = self._loop()
        pages = self.alist_pages(prefix, start_after)
        try:
            while (page := run_bounded(loop, _next_page(pages), f"list {prefix!r}", self.config.timeout_s)) is not None:
                yield page
        finally:
            # Close a listing left part-way on the loop it ran on, whatever its deadline: best effort.
            if not loop.is_closed():
                closing = asyncio.run_coroutine_threadsafe(aclose_pages(pages), loop)
                with contextlib.suppress(Exception):
                    closing.result(CANCEL_GRACE_S)

    def close(self) -> None:
        with self._loop_lock:
            thread, self._loop_thread = self._loop_thread, None
            self._loop_closed = True
        if thread is not None:
            thread.close()
        super().close()


async def _next_page(pages: AsyncIterator[Sequence[ObjectInfo]]) -> Sequence[ObjectInfo] | None:
    return await anext(pages, None)
