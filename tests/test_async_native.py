"""The asyncio API awaits a backend's own coroutines: no thread per call, one bound for every caller.

An in-test ``AsyncBackend`` (objects in a dict, each call a coroutine that can be held open)
stands for the S3 clients, so that what is asserted is the core's: where the coroutines run,
how the in-flight bound is shared by threads and loops, what a cancel or ``close`` does, and
that layers apply on both paths.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import kvstore
from kvstore import KVStoreError, StoreTimeout, StoreUnavailable
from kvstore.backends import call
from kvstore.backends.base import ObjectInfo, ReadResult, pages_of
from kvstore.backends.coroutines import AsyncBackend
from kvstore.layers import wrap
from kvstore.layers.base import Layer
from kvstore.store import KVStore


class DictBackend(AsyncBackend):
    """Coroutines only. ``gate``, when set, holds every read until it is set; ``fail`` errors come first."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.objects: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.threads: set[int] = set()
        self.running = 0
        self.most = 0
        self.gate: asyncio.Event | None = None
        self.hold_s = 0.0
        self.fail: list[Exception] = []
        self.late_writes: list[str] = []

    async def _enter(self) -> None:
        self.threads.add(threading.get_ident())
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            if self.hold_s:
                await asyncio.sleep(self.hold_s)
            if self.fail:
                raise self.fail.pop(0)
        finally:
            self.running -= 1

    async def aput(self, name, data, metadata, *, if_absent=False):
        await self._enter()
        self.objects[name] = (bytes(data), dict(metadata))

    async def aget_into(self, name, buffer, on_chunk=None):
        await self._enter()
        if name not in self.objects:
            return None
        data, meta = self.objects[name]
        lease = call.lease()
        half = len(data) // 2
        call.land_piece(lease, buffer, 0, data[:half], on_chunk)
        if self.gate is not None:
            def deliver_late() -> None:
                # A client's own thread goes on delivering bytes after a cancel: the lease must refuse them.
                time.sleep(0.1)
                try:
                    call.land_piece(lease, buffer, half, data[half:], on_chunk)
                except call.CallAbandoned:
                    self.late_writes.append("refused")
                else:
                    self.late_writes.append("landed")

            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                threading.Thread(target=deliver_late).start()
                raise
        call.land_piece(lease, buffer, half, data[half:], on_chunk)
        return ReadResult(len(data), dict(meta))

    async def ahead(self, name):
        await self._enter()
        found = self.objects.get(name)
        return None if found is None else ObjectInfo(name, len(found[0]), dict(found[1]))

    async def adelete_many(self, names):
        await self._enter()
        return [self.objects.pop(n, None) is not None for n in names]

    async def alist_pages(self, prefix, start_after=None):
        await self._enter()
        infos = [ObjectInfo(n, len(d), m) for n, (d, m) in sorted(self.objects.items())]
        for page in pages_of(infos, prefix, start_after, size=2):
            yield page


def _open(extra: dict | None = None) -> tuple[KVStore, DictBackend]:
    config = kvstore.resolve("memory://async-native", {"kvstore_checksum": "crc32c", **(extra or {})})
    backend = DictBackend(config)
    return KVStore(config, wrap(backend, config)), backend


def test_the_asyncio_api_runs_the_backend_coroutines_on_the_callers_loop_and_the_blocking_api_mirrors_them():
    store, backend = _open()
    with store:
        async def work() -> int:
            await store.aput("a/1", b"one", {"m": "x"})
            await store.aput_many({"a/2": b"two", "b/3": b"three"})
            buffer = bytearray(8)
            got = await store.aget_into("a/1", buffer, info=True)
            assert got is not None and got.size == 3 and got.metadata["m"] == "x" and buffer[:3] == b"one"
            assert [k async for k in store.alist("a/")] == ["a/1", "a/2"]
            assert await store.adelete("b/3") and not await store.aexists("b/3")
            return threading.get_ident()

        before = threading.active_count()
        loop_thread = asyncio.run(work())
        assert backend.threads == {loop_thread}, "a coroutine ran off the caller's loop thread"
        assert threading.active_count() == before, "the asyncio path started a thread"
        # The blocking API: the same coroutines, on the one loop thread the backend owns.
        assert store.get("a/2") == b"two" and store.list("a/") and store.stat("a/1").size == 3
        assert len(backend.threads - {loop_thread}) == 1


def test_one_bound_holds_threads_and_event_loops_together():
    store, backend = _open({"kvstore_max_inflight": 3})
    backend.hold_s = 0.05
    with store:
        store.put("k", b"x" * 10)

        async def reads(n: int) -> None:
            await asyncio.gather(*(store.aget_into("k", bytearray(10)) for _ in range(n)))

        threads = [threading.Thread(target=asyncio.run, args=(reads(8),)) for _ in range(2)]
        threads += [threading.Thread(target=lambda: [store.get("k") for _ in range(4)])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert backend.most == 3, f"{backend.most} calls ran at once under kvstore_max_inflight=3"


def test_a_cancelled_wait_for_a_slot_gives_nothing_away_and_close_wakes_the_waiters():
    store, backend = _open({"kvstore_max_inflight": 1})
    with store:
        store.put("k", b"x")

        async def run() -> None:
            backend.gate = asyncio.Event()
            holder = asyncio.create_task(store.aget_into("k", bytearray(1)))
            await asyncio.sleep(0.05)
            waiters = [asyncio.create_task(store.aget("k")) for _ in range(5)]
            await asyncio.sleep(0.05)
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
            backend.gate.set()
            await holder
            backend.gate = None
            # Every slot came back: five calls in a row each get the one slot at once.
            for _ in range(5):
                assert await asyncio.wait_for(store.aget("k"), 2) == b"x"

        asyncio.run(run())

    store, backend = _open({"kvstore_max_inflight": 1})
    store.put("k", b"x")

    async def closing() -> list[object]:
        backend.gate = asyncio.Event()
        holder = asyncio.create_task(store.aget_into("k", bytearray(1)))
        await asyncio.sleep(0.05)
        queued = [asyncio.create_task(store.aget("k")) for _ in range(3)]
        await asyncio.sleep(0.05)
        store.close()
        outcomes = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 2)
        backend.gate.set()
        await asyncio.gather(holder, return_exceptions=True)
        return outcomes

    outcomes = asyncio.run(closing())
    assert all(isinstance(o, KVStoreError) and "closed" in str(o) for o in outcomes), outcomes


def test_a_cancel_revokes_the_buffer_before_it_propagates():
    store, backend = _open()
    with store:
        store.put("k", b"a" * 8 + b"b" * 8)
        buffer = bytearray(16)

        async def run() -> None:
            backend.gate = asyncio.Event()
            task = asyncio.create_task(store.aget_into("k", buffer))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.3)

        asyncio.run(run())
        assert backend.late_writes == ["refused"]
        assert buffer == b"a" * 8 + bytes(8), "bytes landed in the buffer after the cancel returned"


def test_retries_and_the_deadline_hold_on_the_asyncio_path():
    store, backend = _open({"kvstore_max_retries": 3, "kvstore_timeout_s": 0.5})
    with store:
        store.put("k", b"v")
        backend.fail = [StoreUnavailable("503", retryable=True, status=503)] * 2
        assert asyncio.run(store.aget("k")) == b"v"
        assert store.metrics()["operations"]["get"]["retries"] == 2
        backend.hold_s = 0.2
        backend.fail = [StoreTimeout("slow")] * 10
        start = time.monotonic()
        with pytest.raises(StoreTimeout):
            asyncio.run(store.astat("k"))
        assert time.monotonic() - start < 0.5 + 0.3


class PutCounter(Layer):
    """A layer written for the blocking API alone."""

    def __init__(self, inner, config) -> None:
        super().__init__(inner, config)
        self.puts = 0

    def put(self, name, data, metadata, *, if_absent=False):
        self.puts += 1
        return self.inner.put(name, data, metadata, if_absent=if_absent)


def test_a_layer_written_for_the_blocking_api_still_applies_to_asyncio_callers():
    config = kvstore.resolve("memory://async-layer")
    backend = DictBackend(config)
    counter = PutCounter(backend, config)
    with KVStore(config, counter) as store:
        asyncio.run(store.aput("k", b"v"))
        store.put("k2", b"v")
        assert counter.puts == 2 and set(backend.objects) == {"k", "k2"}


def test_a_layer_that_hooks_around_alone_is_refused_at_once():
    with pytest.raises(TypeError, match="aaround"):
        class Blind(Layer):
            def around(self, op, call, nbytes=0):
                return call()


def test_the_embedded_stores_serve_asyncio_without_a_thread_per_call(tmp_path):
    with kvstore.open("memory://async-embedded") as store:
        async def many() -> None:
            await asyncio.gather(*(store.aput(f"k{i}", b"v") for i in range(64)))
            assert await store.aget_many([f"k{i}" for i in range(64)]) == [b"v"] * 64

        before = threading.active_count()
        asyncio.run(many())
        assert threading.active_count() == before
    with kvstore.open(f"file://{tmp_path}/root", {"kvstore_max_inflight": 4}) as store:
        async def files() -> None:
            await asyncio.gather(*(store.aput(f"k{i}", b"v") for i in range(32)))

        before = threading.active_count()
        asyncio.run(files())
        assert threading.active_count() - before <= 4, "the file store's pool outgrew kvstore_max_inflight"
