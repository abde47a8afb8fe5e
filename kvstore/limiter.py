"""``Inflight``: one bound on the calls in flight, shared by threads and by event loops.

A store is used from blocking threads and from any number of event loops at once (LMCache runs
one of its own), and ``max_inflight`` bounds them all together. A ``threading.Semaphore``
would block an event loop; an ``asyncio.Semaphore`` belongs to one loop. So waiting threads
sleep on a condition and waiting coroutines on a future of their own loop, and a released slot
goes to the coroutine that waited longest (then to a thread). ``close`` wakes every waiter with
a ``KVStoreError`` rather than leaving it asleep.
"""

from __future__ import annotations

import asyncio
import collections
import threading

from kvstore.errors import KVStoreError


class _Ticket:
    """A coroutine's place in the queue; ``granted`` once a slot has been handed to it."""

    __slots__ = ("loop", "future", "granted")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.granted = False


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # cancelled meanwhile: the waiter gives the slot back itself
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class Inflight:
    """At most ``limit`` calls at once, across threads (``acquire``) and event loops (``aacquire``)."""

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._closed = False
        self._cond = threading.Condition()
        self._queue: collections.deque[_Ticket] = collections.deque()

    def acquire(self) -> None:
        with self._cond:
            while self._free <= 0 and not self._closed:
                self._cond.wait()
            if self._closed:
                raise KVStoreError("the store is closed")
            self._free -= 1

    async def aacquire(self) -> None:
        with self._cond:
            if self._closed:
                raise KVStoreError("the store is closed")
            if self._free > 0:
                self._free -= 1
                return
            ticket = _Ticket(asyncio.get_running_loop())
            self._queue.append(ticket)
        try:
            await ticket.future
        except BaseException:
            with self._cond:
                if ticket.granted and not self._closed:
                    self._release()  # handed a slot just as it gave up: pass it on
                elif ticket in self._queue:
                    self._queue.remove(ticket)
            raise

    def release(self) -> None:
        with self._cond:
            self._release()

    def _release(self) -> None:
        while self._queue:
            ticket = self._queue.popleft()
            try:
                ticket.loop.call_soon_threadsafe(_settle, ticket.future, None)
            except RuntimeError:  # its loop has closed: nobody waits there
                continue
            ticket.granted = True
            return
        self._free += 1
        self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            queue, self._queue = self._queue, collections.deque()
        for ticket in queue:
            ticket.granted = True  # nothing to give back: the store is closed
            try:
                ticket.loop.call_soon_threadsafe(_settle, ticket.future, KVStoreError("the store is closed"))
            except RuntimeError:
                pass
