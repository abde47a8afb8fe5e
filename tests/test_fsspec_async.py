"""The fsspec backend's asyncio path on S3: aiobotocore coroutines awaited from the caller's loop.

Each request runs on s3fs's loop, where its client lives, and the caller's loop awaits it there:
no thread per request, a cancel stops the request on s3fs's loop and nothing lands in the
buffer afterwards, and the operation's deadline holds against a server that keeps the answer
coming too slowly for any socket timeout to fire. moto runs in a process of its own; the fault
proxy in front of it runs a thread per connection in this one, which the thread counts leave out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

import pytest

import kvstore
from kvstore.errors import StoreTimeout
from kvstore.testing.faults import FaultProxy

pytestmark = [pytest.mark.servers, pytest.mark.timeout(120)]
MiB = 1 << 20
SMALL = bytes(range(256)) * 256  # 64 KiB
BIG = bytes(range(251)) * (3 * MiB // 251)  # several 1 MiB pieces
READS = 64
GRACE_S = 1.0  # the cancel grace (coroutines.CANCEL_GRACE_S) plus scheduling on a busy 2-core host


@pytest.fixture
def proxied(s3_servers, unique_name):
    server = s3_servers.get("moto")
    bucket = unique_name("fsasync")
    server.create_bucket(bucket)
    with FaultProxy(server.port) as proxy:
        yield server, bucket, proxy


def open_store(server, bucket, proxy, **extra):
    config = {"kvstore_backend": "fsspec", "s3_endpoint_url": proxy.endpoint, "kvstore_breaker_threshold": 0,
              "kvstore_connect_timeout_s": 2, **extra}
    return kvstore.open(f"s3://{bucket}/a", server.extra_config(**config))


def our_threads() -> int:
    """``threading.active_count()`` less the fault proxy's connection threads (``FaultProxy._serve``)."""
    return threading.active_count() - proxy_threads()


def proxy_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.endswith("(_serve)"))


def loop_tasks(loop: asyncio.AbstractEventLoop) -> int:
    """Tasks on ``loop`` (s3fs's) other than the one counting."""
    async def count() -> int:
        return sum(1 for t in asyncio.all_tasks() if t is not asyncio.current_task())

    return asyncio.run_coroutine_threadsafe(count(), loop).result(5)


def wait_for_tasks(loop: asyncio.AbstractEventLoop, at_most: int, within: float) -> int:
    end = time.monotonic() + within
    while (n := loop_tasks(loop)) > at_most and time.monotonic() < end:
        time.sleep(0.02)
    return n


def test_64_concurrent_aget_into_add_no_thread_per_request(proxied):
    server, bucket, proxy = proxied
    with open_store(server, bucket, proxy, kvstore_max_inflight=128, kvstore_timeout_s=30) as store:
        assert type(store.backend.unwrap()).__name__ == "FsspecS3Backend"
        for i in range(READS):  # one at a time: a batch would start KVStore's pool threads before the count
            store.put(f"k{i}", SMALL)
        buffers = [bytearray(len(SMALL)) for _ in range(READS)]

        async def read_all() -> tuple[int, int, int, int, list]:
            await store.aget_into("k0", buffers[0])  # the session and a connection exist before counting
            before = our_threads()
            proxy.delay(0.5)  # every answer waits: all 64 reads are in flight at once
            tasks = [asyncio.ensure_future(store.aget_into(f"k{i}", b)) for i, b in enumerate(buffers)]
            most, most_proxied, ticks = before, 0, 0
            while not all(t.done() for t in tasks):
                most, most_proxied = max(most, our_threads()), max(most_proxied, proxy_threads())
                ticks += 1  # the caller's loop keeps turning while the reads wait
                await asyncio.sleep(0.005)
            return before, most, most_proxied, ticks, await asyncio.gather(*tasks)

        before, most, most_proxied, ticks, sizes = asyncio.run(read_all())
        proxy.clear()
        assert sizes == [len(SMALL)] * READS
        assert all(b == SMALL for b in buffers)
        print(f"threads: {before} before, at most {most} with {READS} reads in flight "
              f"({most_proxied} proxy connection threads, {ticks} loop ticks)")
        # A thread per request (the base class's pool, asyncio.to_thread) would add dozens here.
        assert most - before <= 3, f"{most - before} threads were added for {READS} reads in flight"
        # The reads really overlapped: one connection each (one reused from the warm-up), all open at once.
        assert most_proxied >= READS // 2, f"only {most_proxied} connections at once: the reads did not overlap"
        assert ticks >= 20, f"the caller's loop turned {ticks} times in >= 0.5 s: something blocked it"


def test_a_cancelled_aget_into_stops_on_s3fs_loop_and_never_writes_afterwards(proxied):
    server, bucket, proxy = proxied
    with open_store(server, bucket, proxy, kvstore_timeout_s=20) as store:
        store.put("big", BIG)
        loop = store.backend.unwrap().fs.loop
        idle = loop_tasks(loop)
        buffer = bytearray(len(BIG))

        async def cancel_midway() -> int:
            proxy.hold(after_bytes=MiB + 12345, method="GET")
            task = asyncio.ensure_future(store.aget_into("big", buffer))
            assert await asyncio.to_thread(proxy.holding.wait, 10), "the response was never held"
            await asyncio.sleep(0.3)  # the bytes before the hold have landed
            assert buffer[:4096] == BIG[:4096], "the read was not under way when it was cancelled"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return loop_tasks(loop)

        asyncio.run(cancel_midway())
        buffer[:] = b"\x55" * len(BIG)  # the caller reuses the buffer at once, as LMCache's allocator does
        # The response is still held: only a cancel on s3fs's loop can have ended the request there.
        left = wait_for_tasks(loop, idle, GRACE_S)
        assert left <= idle, f"{left - idle} task(s) of the cancelled read still run on s3fs's loop"
        proxy.release()
        time.sleep(1.0)  # the rest of the body is let through: nothing may land
        assert bytes(buffer) == b"\x55" * len(BIG), "the buffer was written after the cancel had returned"
        proxy.clear()
        assert store.get_into("big", buffer) == len(BIG) and bytes(buffer) == BIG  # still usable


@pytest.mark.parametrize("fault", ["trickle", "stall"])
def test_the_asyncio_path_honours_the_deadline_against_a_stalled_server(proxied, fault):
    """``trickle``: a byte every 50 ms, so no socket read ever times out; only the deadline ends the read."""
    server, bucket, proxy = proxied
    timeout_s = 1.5
    with open_store(server, bucket, proxy, kvstore_timeout_s=timeout_s, kvstore_max_retries=2) as store:
        store.put("slow", SMALL)
        store.get_into("slow", bytearray(len(SMALL)))  # warm: the session and a connection are open
        loop = store.backend.unwrap().fs.loop
        idle = loop_tasks(loop)
        threads = our_threads()

        async def read() -> tuple[BaseException | None, float, int]:
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.ensure_future(tick())
            start = time.monotonic()
            try:
                # Bounded here too, so that a backend that ignores its deadline fails rather than hangs.
                await asyncio.wait_for(store.aget_into("slow", bytearray(len(SMALL))), timeout_s + 10)
                error: BaseException | None = None
            except Exception as exc:
                error = exc
            elapsed = time.monotonic() - start
            ticker.cancel()
            return error, elapsed, ticks

        if fault == "trickle":
            proxy.trickle(0.05, count=None)
        else:
            proxy.stall(count=None)
        error, elapsed, ticks = asyncio.run(read())
        print(f"{fault}: {type(error).__name__} after {elapsed:.2f} s, threads {threads} -> {our_threads()}")
        assert isinstance(error, StoreTimeout), repr(error)
        assert elapsed < timeout_s + GRACE_S, f"the read took {elapsed:.2f} s with a {timeout_s} s deadline"
        assert ticks >= elapsed * 100 * 0.3, f"the caller's loop turned {ticks} times in {elapsed:.2f} s"
        left = wait_for_tasks(loop, idle, GRACE_S)
        assert left <= idle, f"{left - idle} task(s) of the timed-out read still run on s3fs's loop"
        assert our_threads() - threads <= 1, "the asyncio path started threads"
        proxy.release()
        proxy.clear()


def established_to(port: int) -> set[str]:
    """This process's TCP sockets connected to ``port`` and ESTABLISHED (their inodes, from /proc)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                ours.add(link[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()  # sl, local, remote, state, ..., inode (the 10th)
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01" and fields[9] in ours:
                    found.add(fields[9])
    return found


def wait_closed(port: int, sockets: set[str], within: float) -> set[str]:
    """Which of ``sockets`` are still open after at most ``within`` seconds."""
    end = time.monotonic() + within
    while (left := sockets & established_to(port)) and time.monotonic() < end:
        time.sleep(0.02)
    return left


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads the connection table from /proc")
def test_close_closes_the_s3fs_client_and_leaves_other_stores_working(s3_servers, unique_name):
    """close() closes the aiobotocore client's pooled sockets now, not at GC, and only its own store's.

    On SeaweedFS, which keeps connections alive (moto answers ``Connection: close``, so no socket
    outlives a request there); it runs in a process of its own, so each socket counted is a client's.
    """
    server = s3_servers.get("seaweedfs")
    bucket = unique_name("fsclose")
    server.create_bucket(bucket)
    config = server.extra_config(kvstore_backend="fsspec", kvstore_breaker_threshold=0, kvstore_timeout_s=20)
    buffer = bytearray(len(SMALL))
    port = server.port

    never_used = kvstore.open(f"s3://{bucket}/a", config)
    started = time.monotonic()
    never_used.close()  # no request was made: nothing to close, and no wait
    assert time.monotonic() - started < 1.0

    before = established_to(port)  # the bucket helper's own pool, if it kept a connection
    first = kvstore.open(f"s3://{bucket}/a", config)
    other = kvstore.open(f"s3://{bucket}/a", config)  # open all along, on the same endpoint
    assert type(first.backend.unwrap()).__name__ == "FsspecS3Backend"
    assert first.backend.unwrap().fs is not other.backend.unwrap().fs
    first.put("k", SMALL)
    assert asyncio.run(first.aget_into("k", buffer)) == len(SMALL) and bytes(buffer) == SMALL
    first_sockets = established_to(port) - before
    assert other.get_into("k", buffer) == len(SMALL)
    other_sockets = established_to(port) - before - first_sockets
    assert first_sockets and other_sockets, "the clients keep no connection open: the test would show nothing"

    first.close()
    first.close()  # idempotent
    left = wait_closed(port, first_sockets, 2.0)
    assert not left, f"{len(left)} of {len(first_sockets)} connection(s) remain after close(): the client was left open"
    assert other_sockets <= established_to(port), "closing one store closed another store's connection"
    assert other.get_into("k", buffer) == len(SMALL) and bytes(buffer) == SMALL
    assert asyncio.run(other.aget_into("k", buffer)) == len(SMALL)

    with kvstore.open(f"s3://{bucket}/a", config) as later:  # opened afterwards on the same endpoint
        later.put("k2", SMALL)
        assert asyncio.run(later.aget_into("k2", buffer)) == len(SMALL) and bytes(buffer) == SMALL
    other.close()
    left = wait_closed(port, other_sockets, 2.0)
    assert not left, f"{len(left)} connection(s) remain after the other store was closed"
