"""The obstore backend on the asyncio path: its coroutines await obstore on the caller's loop.

Against moto (behind the fault proxy where a response must be slowed or withheld): many reads in
flight cost no thread each, a cancelled read stops its body stream and writes nothing more, the
call's deadline holds on both paths, and one store serves several event loops at once.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

import kvstore
from kvstore.backends import call
from kvstore.bench.runner import os_threads
from kvstore.errors import StoreTimeout, StoreUnavailable
from kvstore.testing.faults import FaultProxy

pytestmark = [pytest.mark.servers, pytest.mark.timeout(120)]
MiB = 1 << 20
BIG = bytes(range(251)) * (3 * MiB // 251)  # several 1 MiB pieces
GRACE_S = 0.75  # the cancel grace (coroutines.CANCEL_GRACE_S) plus scheduling on a busy 2-core host


@pytest.fixture
def moto(s3_servers):
    return s3_servers.get("moto")


@pytest.fixture
def bucket(moto, unique_name):
    name = unique_name("obs-async")
    moto.create_bucket(name)
    return name


@pytest.fixture
def proxy(moto):
    with FaultProxy(moto.port) as proxy:
        yield proxy


def open_store(server, bucket, endpoint=None, **extra):
    config = {"kvstore_backend": "obstore", "kvstore_timeout_s": 10, "kvstore_connect_timeout_s": 1,
              "kvstore_breaker_threshold": 0, **extra}
    if endpoint:
        config["s3_endpoint_url"] = endpoint
    return kvstore.open(f"s3://{bucket}/a", server.extra_config(**config))


class _PeakThreads:
    """The most Python threads and OS threads seen (every 2 ms) while it runs; its own thread is in the baseline."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-threads", daemon=True)
        self.python = self.os = 0

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.python = max(self.python, threading.active_count())
            self.os = max(self.os, os_threads())

    def __enter__(self) -> _PeakThreads:
        self._thread.start()
        time.sleep(0.01)
        self.python_before, self.os_before = threading.active_count(), os_threads()
        self.python, self.os = self.python_before, self.os_before
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts OS threads through /proc")
def test_64_concurrent_aget_into_add_no_thread_per_read(moto, bucket):
    n = 64
    keys = [f"t/{i:02d}" for i in range(n)]
    # max_inflight 64: a backend that ran each read on a thread of a pool would hold 64 of them.
    with open_store(moto, bucket, kvstore_max_inflight=n, kvstore_timeout_s=60) as store:
        buffers = [bytearray(len(BIG)) for _ in keys]

        async def run() -> tuple[_PeakThreads, list[int | None]]:
            await store.aput_many((k, BIG) for k in keys)
            assert await store.aget_into(keys[0], buffers[0]) == len(BIG)  # obstore's runtime is up
            with _PeakThreads() as peak:
                sizes = list(await asyncio.gather(*(store.aget_into(k, b) for k, b in zip(keys, buffers))))
            return peak, sizes

        peak, sizes = asyncio.run(run())
        print(f"threads with {n} reads in flight: python {peak.python_before} -> {peak.python}, "
              f"os {peak.os_before} -> {peak.os}")
        assert sizes == [len(BIG)] * n and all(b == BIG for b in buffers)
        assert peak.python - peak.python_before <= 2, f"{peak.python - peak.python_before} Python threads for {n} reads"
        # obstore completes each future from tokio's blocking pool, whose threads wait there for the
        # GIL: the pool grows with the completions that queue for it (5 to 23 for 64 reads here) and
        # is reused, never one per read. A thread per read shows in Python's count above.
        assert peak.os - peak.os_before < n, f"{peak.os - peak.os_before} OS threads for {n} reads"
        assert store.backend.unwrap()._loop_thread is None, "the asyncio path started the blocking mirror's loop thread"


def test_a_cancelled_aget_into_drops_its_stream_and_writes_nothing_afterwards(moto, bucket, proxy):
    with open_store(moto, bucket) as direct:
        direct.put("big", BIG)
    # Only the one GET goes through the proxy: its connection is the only one there.
    with open_store(moto, bucket, proxy.endpoint) as store:
        buffer = bytearray(len(BIG))
        proxy.hold(after_bytes=MiB + 12345)  # the first piece lands, the rest is withheld

        async def cancel_mid_body() -> None:
            task = asyncio.ensure_future(store.aget_into("big", buffer))
            assert await asyncio.to_thread(proxy.holding.wait, 10), "the response was never held"
            deadline = time.monotonic() + 5
            while buffer[:MiB] != BIG[:MiB]:  # the bytes before the hold have landed
                assert time.monotonic() < deadline, "the first piece never landed"
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.2)
            # The request was stopped, not left to run on (a lease would refuse its bytes, but it
            # would hold its connection and read on until the next piece).
            assert asyncio.all_tasks() == {asyncio.current_task()}, "the read's request went on after the cancel"

        asyncio.run(cancel_mid_body())
        buffer[:] = b"\x55" * len(BIG)  # the caller reuses the buffer at once, as LMCache's allocator does
        proxy.release()
        time.sleep(1.5)  # the rest of the body is let through: nothing may land
        assert bytes(buffer) == b"\x55" * len(BIG), "the buffer was written after the cancel had returned"
        # A read that went on (lease or no lease) would have taken the body and kept the connection.
        assert proxy.open_sockets() == 0, "the cancelled read kept its connection: its stream was not dropped"
        assert store.get("big") == BIG  # the store is still usable


async def _pages(pages) -> list:
    return [page async for page in pages]


@pytest.mark.parametrize("path", ["blocking", "asyncio"])
@pytest.mark.parametrize("op", ["get_into", "get", "stat", "put", "list"])
def test_a_call_ends_at_its_deadline_against_a_stalled_server(moto, bucket, proxy, op, path):
    with open_store(moto, bucket) as direct:
        direct.put("k", b"x" * 1000)
    # The client's own timeout (timeout_s, 30 s) is far away: only the call's deadline can end it.
    with open_store(moto, bucket, proxy.endpoint, kvstore_timeout_s=30) as store:
        backend = store.backend.unwrap()
        name, buffer, data = store.name_of("k"), memoryview(bytearray(1000)), memoryview(b"y" * 1000)
        if path == "blocking":
            calls = {"get_into": lambda: backend.get_into(name, buffer), "get": lambda: backend.get(name),
                     "stat": lambda: backend.head(name), "put": lambda: backend.put(name, data, {}),
                     "list": lambda: list(backend.list_pages("a/"))}
        else:  # asyncio.run's task starts in a copy of this context: it sees the call below
            calls = {"get_into": lambda: asyncio.run(backend.aget_into(name, buffer)),
                     "get": lambda: asyncio.run(backend.aget(name)), "stat": lambda: asyncio.run(backend.ahead(name)),
                     "put": lambda: asyncio.run(backend.aput(name, data, {})),
                     "list": lambda: asyncio.run(_pages(backend.alist_pages("a/")))}
        proxy.stall()
        deadline_s = 1.0
        start = time.monotonic()
        with call.running(call.Call(deadline_s)), pytest.raises(StoreTimeout):
            calls[op]()
        took = time.monotonic() - start
        assert took < deadline_s + GRACE_S, f"{path} {op} took {took:.2f} s with a {deadline_s} s deadline"
        proxy.clear()
        assert store.get("k") is not None


def test_a_store_call_against_a_stalled_server_ends_at_timeout_s_on_both_paths(moto, bucket, proxy):
    with open_store(moto, bucket) as direct:
        direct.put("k", b"x" * 1000)
    with open_store(moto, bucket, proxy.endpoint, kvstore_timeout_s=1.5) as store:
        proxy.stall()
        for label, read in (("blocking", lambda: store.get_into("k", bytearray(1000))),
                            ("asyncio", lambda: asyncio.run(store.aget_into("k", bytearray(1000))))):
            start = time.monotonic()
            with pytest.raises((StoreTimeout, StoreUnavailable)):
                read()
            took = time.monotonic() - start
            assert took < 1.5 + GRACE_S, f"{label}: {took:.2f} s with timeout_s 1.5"
        proxy.clear()


def test_one_store_serves_several_event_loops_and_the_blocking_api_at_once(moto, bucket):
    with open_store(moto, bucket, kvstore_max_inflight=16) as store:
        store.put("seed", BIG)  # first used from the blocking mirror's loop thread
        errors: list[BaseException] = []

        async def work(tag: str) -> None:
            await store.aput_many({f"{tag}/{i}": BIG[i:] for i in range(6)})
            buffers = [bytearray(len(BIG)) for _ in range(6)]
            sizes = await store.aget_into_many([f"{tag}/{i}" for i in range(6)], buffers)
            assert sizes == [len(BIG) - i for i in range(6)]
            assert all(bytes(b[:n]) == BIG[i:] for i, (b, n) in enumerate(zip(buffers, sizes)))
            assert sorted([k async for k in store.alist(f"{tag}/")]) == [f"{tag}/{i}" for i in range(6)]
            assert await store.aget("seed") == BIG

        def in_thread(target) -> None:
            try:
                target()
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=in_thread, args=(lambda t=t: asyncio.run(work(t)),)) for t in "abc"]
        threads.append(threading.Thread(target=in_thread, args=(lambda: [store.get("seed") for _ in range(5)],)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert asyncio.run(work("d")) is None  # and again on yet another loop, after the others closed
