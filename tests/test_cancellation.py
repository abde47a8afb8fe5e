"""Nothing writes a caller's buffer after a cancel, a timeout or ``close()`` has returned.

Every S3 backend runs against moto behind the fault proxy, which holds each response long enough
for the caller to give up first; then the response is let through and the buffer is watched.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import kvstore
from kvstore import KVStoreError
from kvstore.backends import call
from kvstore.testing.faults import FaultProxy

pytestmark = [pytest.mark.servers, pytest.mark.timeout(90)]
HOLD_S = 1.5
SIZE = 3 << 20  # several pieces and (for crt) several parts
OLD, NEW = b"\xaa" * SIZE, b"\x55" * SIZE



@pytest.fixture
def held(s3_servers, unique_name, backend):
    """A store whose endpoint holds every response ``HOLD_S`` once ``proxy.delay`` is on, with key 'a' = OLD."""
    server = s3_servers.get("moto")
    bucket = unique_name("cancel")
    server.create_bucket(bucket)
    with FaultProxy(server.port) as proxy:
        extra = server.extra_config(s3_endpoint_url=proxy.endpoint, kvstore_backend=backend, kvstore_timeout_s=10,
                                    kvstore_breaker_threshold=0, s3_part_size=5 << 20, kvstore_max_inflight=2)
        store = kvstore.open(f"s3://{bucket}/c", extra)
        try:
            store.put("a", OLD)
            yield store, proxy
        finally:
            store.close()


def settle_then_check(buffer: bytearray, expected: bytes) -> None:
    """Give a runaway transfer every chance to land (the held response is released meanwhile)."""
    time.sleep(HOLD_S + 1.5)
    assert bytes(buffer) == expected, "the buffer was written after the call had returned"


def test_a_cancelled_aget_into_never_writes_afterwards(held):
    store, proxy = held
    buffer = bytearray(SIZE)
    proxy.delay(HOLD_S)

    async def cancel_one():
        task = asyncio.ensure_future(store.aget_into("a", buffer))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_one())
    buffer[:] = NEW  # the caller reuses the buffer at once, as LMCache's allocator does
    settle_then_check(buffer, NEW)


def test_a_wait_for_timeout_never_writes_afterwards(held):
    store, proxy = held
    buffer = bytearray(SIZE)
    proxy.delay(HOLD_S)

    async def time_out():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(store.aget_into("a", buffer), 0.3)

    asyncio.run(time_out())
    buffer[:] = NEW
    settle_then_check(buffer, NEW)
    proxy.clear()
    assert store.get_into("a", buffer) == SIZE and bytes(buffer) == OLD  # the store is still usable


def test_close_stops_reads_in_flight_and_fails_queued_ones_with_a_store_error(held):
    store, proxy = held
    buffers = [bytearray(SIZE) for _ in range(5)]  # max_inflight=2: three wait behind the first two
    proxy.delay(HOLD_S)

    async def close_midway():
        tasks = [asyncio.ensure_future(store.aget_into("a", b)) for b in buffers]
        await asyncio.sleep(0.4)
        store.close()
        for b in buffers:
            b[:] = NEW
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(close_midway())
    for result in results:
        assert isinstance(result, KVStoreError), f"expected a KVStoreError, got {result!r}"
    for b in buffers:
        settle_then_check(b, NEW)


def test_revoking_a_lease_mid_read_stops_a_direct_backend_call(held):
    """The primitive under the store: a backend call that outlives its caller can no longer write."""
    store, proxy = held
    backend = store.backend
    buffer = memoryview(bytearray(SIZE))
    lease = call.BufferLease()
    proxy.delay(HOLD_S)
    outcome: list[object] = []

    def read() -> None:
        with call.running(call.Call(10, lease)):
            try:
                outcome.append(backend.get_into("c/a", buffer))
            except KVStoreError as exc:
                outcome.append(exc)

    import threading

    thread = threading.Thread(target=read)
    thread.start()
    time.sleep(0.3)
    lease.revoke("test")
    buffer[:] = NEW
    thread.join(10)
    assert outcome and isinstance(outcome[0], KVStoreError), outcome
    assert bytes(buffer) == NEW
