"""obstore and fsspec against real servers behind the fault proxy: deadlines, leases, loud errors, verified uploads."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import kvstore
from kvstore import KVStoreError
from kvstore.backends import call
from kvstore.errors import AuthError, BucketNotFound, StoreTimeout, StoreUnavailable
from kvstore.testing.faults import Fault, FaultProxy

pytestmark = [pytest.mark.servers, pytest.mark.timeout(90)]
BACKENDS = ["obstore", "fsspec"]  # crt: tests/test_crt_hardening.py
TIMEOUT_S = 2.0
GRACE_S = 0.75  # the cancel grace (s3probe.CANCEL_GRACE_S) plus scheduling on a busy 2-core host
MiB = 1 << 20
DATA = bytes(range(256)) * 1024 * 3  # 768 KiB
BIG = bytes(range(251)) * (3 * MiB // 251)  # several 1 MiB pieces



@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def moto(s3_servers):
    return s3_servers.get("moto")


@pytest.fixture
def proxied(moto, unique_name):
    bucket = unique_name("hard")
    moto.create_bucket(bucket)
    with FaultProxy(moto.port) as proxy:
        yield moto, bucket, proxy
    assert proxy.open_sockets() == 0


def open_store(server, bucket, backend, endpoint=None, **extra):
    config = {"kvstore_backend": backend, "kvstore_timeout_s": TIMEOUT_S, "kvstore_connect_timeout_s": 1,
              "kvstore_checksum": "crc32c", "kvstore_breaker_threshold": 0, **extra}
    if endpoint:
        config["s3_endpoint_url"] = endpoint
    return kvstore.open(f"s3://{bucket}/h", server.extra_config(**config))


def seed(server, bucket, backend, key, data):
    """Write ``key`` straight to the server with time to spare: setup must not race the short deadline."""
    with open_store(server, bucket, backend, kvstore_timeout_s=30) as direct:
        direct.put(key, data)


def timed(fn):
    start = time.monotonic()
    try:
        result = fn()
    except KVStoreError as exc:
        result = exc
    return result, time.monotonic() - start


# -- §13.1: a revoked lease means no more writes --------------------------------------------------
def test_revoked_lease_mid_body_stops_the_read_and_never_writes_afterwards(proxied, backend):
    server, bucket, proxy = proxied
    with open_store(server, bucket, backend, proxy.endpoint, kvstore_timeout_s=10) as store:
        store.put("big", BIG)
        name = store.name_of("big")
        buffer = memoryview(bytearray(len(BIG)))
        lease = call.BufferLease()
        outcome: list[object] = []

        def read() -> None:
            with call.running(call.Call(10, lease)):
                try:
                    outcome.append(store.backend.get_into(name, buffer))
                except KVStoreError as exc:
                    outcome.append(exc)

        proxy.hold(after_bytes=2 * MiB + 12345)
        thread = threading.Thread(target=read)
        thread.start()
        assert proxy.holding.wait(10), "the response was never held"
        time.sleep(0.2)  # the pieces before the hold have landed
        revoked = time.monotonic()
        lease.revoke("test")
        thread.join(GRACE_S + 1)
        returned = time.monotonic() - revoked
        assert not thread.is_alive(), "the backend call went on after its lease was revoked"
        assert isinstance(outcome[0], call.CallAbandoned), outcome
        buffer[:] = b"\x55" * len(BIG)  # the caller reuses the buffer at once
        proxy.release()
        time.sleep(1.0)  # the rest of the body is let through: nothing may land
        assert bytes(buffer) == b"\x55" * len(BIG)
        assert returned < GRACE_S + 0.5


def test_close_during_a_held_read_fails_it_and_nothing_lands_afterwards(proxied, backend):
    server, bucket, proxy = proxied
    store = open_store(server, bucket, backend, proxy.endpoint, kvstore_timeout_s=10)
    store.put("big", BIG)
    buffers = [bytearray(len(BIG)) for _ in range(3)]
    proxy.hold(after_bytes=MiB + 1, count=None)

    async def close_midway():
        tasks = [asyncio.ensure_future(store.aget_into("big", b)) for b in buffers]
        await asyncio.to_thread(proxy.holding.wait, 10)
        await asyncio.sleep(0.3)
        store.close()
        for b in buffers:
            b[:] = b"\x55" * len(BIG)
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(close_midway())
    assert all(isinstance(r, KVStoreError) for r in results), results
    proxy.release()
    time.sleep(1.0)
    assert all(bytes(b) == b"\x55" * len(BIG) for b in buffers)


# -- §13.2: every call ends at the deadline -------------------------------------------------------
def test_put_to_a_server_that_never_answers_ends_at_the_deadline(proxied, backend):
    server, bucket, proxy = proxied
    with open_store(server, bucket, backend, proxy.endpoint) as store:
        proxy.stall()  # takes the request, withholds "100 Continue", never answers
        result, took = timed(lambda: store.put("k", BIG))
        assert isinstance(result, StoreTimeout | StoreUnavailable), result
        assert took < TIMEOUT_S + GRACE_S, f"{backend}: put took {took:.2f} s with a {TIMEOUT_S} s deadline"
        proxy.clear()
        store.put("k", DATA)
        assert store.get("k") == DATA


def test_a_trickled_body_ends_at_the_deadline(proxied, backend):
    server, bucket, proxy = proxied
    seed(server, bucket, backend, "k", DATA)
    with open_store(server, bucket, backend, proxy.endpoint) as store:
        proxy.trickle(0.5)
        for read in (lambda: store.get("k"), lambda: store.get_into("k", bytearray(len(DATA)))):
            result, took = timed(read)
            assert isinstance(result, StoreTimeout | StoreUnavailable), result
            assert took < TIMEOUT_S + GRACE_S, f"{backend}: read took {took:.2f} s"
        proxy.clear()
        assert store.get("k") == DATA


@pytest.mark.parametrize("op", ["get", "stat", "put", "list"])
def test_a_slow_503_then_a_stall_ends_within_one_deadline(proxied, backend, op, record_property):
    """The retry after a slow 503 gets only what is left of the deadline, not a fresh one."""
    server, bucket, proxy = proxied
    seed(server, bucket, backend, "k", DATA)
    with open_store(server, bucket, backend, proxy.endpoint) as store:
        calls = {"get": lambda: store.get("k"), "stat": lambda: store.stat("k"),
                 "put": lambda: store.put("k", DATA), "list": lambda: list(store.list())}
        proxy.set(Fault("error", status=503, remaining=1, wait_s=TIMEOUT_S * 0.6), Fault("stall"))
        result, took = timed(calls[op])
        record_property("seconds", round(took, 3))
        print(f"{backend} {op}: {took:.2f} s for a {TIMEOUT_S} s deadline")
        assert isinstance(result, StoreTimeout | StoreUnavailable), result
        assert took < TIMEOUT_S + GRACE_S, f"{backend} {op} took {took:.2f} s ({took / TIMEOUT_S:.2f}x timeout_s)"
        proxy.clear()


def test_list_keeps_transient_errors_transient(proxied, backend):
    server, bucket, proxy = proxied
    seed(server, bucket, backend, "a/1", b"x")
    with open_store(server, bucket, backend, proxy.endpoint, kvstore_max_retries=1) as store:
        proxy.error(503)
        with pytest.raises((StoreUnavailable, StoreTimeout)) as caught:
            list(store.list("a/"))
        assert not isinstance(caught.value, BucketNotFound)
        proxy.error(503, count=1)
        assert list(store.list("a/")) == ["a/1"]  # retried
        proxy.stall()
        result, took = timed(lambda: list(store.list("a/")))
        assert isinstance(result, StoreTimeout | StoreUnavailable) and not isinstance(result, BucketNotFound), result
        proxy.clear()


def test_a_connection_cut_mid_body_is_retried(proxied, backend):
    server, bucket, proxy = proxied
    seed(server, bucket, backend, "k", DATA)
    with open_store(server, bucket, backend, proxy.endpoint) as store:
        for after in (0, 100_000):
            proxy.drop(after, count=1)
            assert store.get("k") == DATA
            proxy.drop(after, count=1)
            buffer = bytearray(len(DATA))
            assert store.get_into("k", buffer) == len(DATA) and buffer == DATA


# -- §12.3: a miss is a miss only when the bucket is there -----------------------------------------
def _every_read(store):
    async def together():
        return await asyncio.gather(store.aget("k"), store.aget_into("k", bytearray(8)), store.aexists("k"),
                                    store.astat("k"), store.aexists_many(["k", "j"]), return_exceptions=True)

    sync = []
    for fn in (lambda: store.get("k"), lambda: store.get_into("k", bytearray(8)), lambda: store.exists("k"),
               lambda: store.stat("k"), lambda: store.exists_many(["k", "j"])):
        try:
            sync.append(fn())
        except KVStoreError as exc:
            sync.append(exc)
    return sync + list(asyncio.run(together()))


def test_every_read_on_a_missing_bucket_raises_bucket_not_found(moto, unique_name, backend):
    with open_store(moto, unique_name("missing"), backend) as store:
        for result in _every_read(store):
            assert isinstance(result, BucketNotFound), result
            assert result.__cause__ is not None or "probe" in str(result)


def test_every_read_with_a_wrong_secret_raises_auth_error(moto, unique_name, backend):
    bucket = unique_name("auth")
    moto.create_bucket(bucket)
    with open_store(moto, bucket, backend, aws_secret_access_key="not-the-secret") as store:
        for result in _every_read(store):
            assert isinstance(result, AuthError), result
            assert result.__cause__ is not None, "the client's exception is lost"
            assert "not-the-secret" not in str(result)


def test_a_miss_costs_one_request_once_the_bucket_is_known(proxied, backend):
    server, bucket, proxy = proxied
    with open_store(server, bucket, backend, proxy.endpoint) as store:
        assert store.stat("absent") is None  # the first miss probes the bucket
        for read in (lambda: store.stat("absent"), lambda: store.get("absent"), lambda: store.exists("absent")):
            before = proxy.responses
            assert not read()
            assert proxy.responses - before == 1


def _innermost(store):
    backend = store.backend
    while hasattr(backend, "inner"):
        backend = backend.inner
    return backend


@pytest.mark.parametrize("name", ["crt", "obstore", "fsspec"])
def test_an_object_replaced_by_a_larger_one_between_head_and_get_is_read_whole(moto, unique_name, name):
    """A backend that sizes its buffer with a HEAD (fsspec) sizes it again when the object grew."""
    bucket = unique_name("grow")
    moto.create_bucket(bucket)
    small, large = b"s" * 1000, bytes(range(256)) * 12
    with open_store(moto, bucket, name, kvstore_timeout_s=20) as store, \
            open_store(moto, bucket, name, kvstore_timeout_s=20) as writer:
        store.put("k", small)
        inner = _innermost(store)
        ahead, replaced = inner.ahead, []

        async def head_then_replace(object_name):
            info = await ahead(object_name)
            if not replaced:  # another writer replaces the object after our HEAD, before our GET
                replaced.append(True)
                await writer.aput("k", large)  # awaited: a blocking call here would hold the backend's loop
            return info

        inner.ahead = head_then_replace  # the coroutine both APIs run (the blocking one is its mirror)
        if name != "fsspec":  # these read with one GET and no HEAD: the replacement comes first
            writer.put("k", large)
        assert store.get("k") == large
        assert store.get("k") == large
        store.put("k", small)
        replaced.clear()
        if name != "fsspec":
            writer.put("k", large)
        assert asyncio.run(store.aget("k")) == large


# -- §13.3: the server verifies what we upload ----------------------------------------------------
@pytest.fixture
def seaweed(s3_servers, unique_name):
    server = s3_servers.get("seaweedfs")
    bucket = unique_name("crc")
    server.create_bucket(bucket)
    with FaultProxy(server.port) as proxy:
        yield server, bucket, proxy


@pytest.mark.parametrize("size", [DATA, BIG * 4], ids=["single", "multipart"])
def test_fsspec_upload_damaged_on_the_way_is_refused_by_a_validating_server(seaweed, size):
    """SeaweedFS checks x-amz-checksum-crc32c (moto does not): a flipped byte fails the PUT, a retry resends it."""
    server, bucket, proxy = seaweed
    data = size
    with open_store(server, bucket, "fsspec", proxy.endpoint, s3_part_size=5 * MiB, kvstore_timeout_s=20) as store:
        proxy.corrupt_request()
        with pytest.raises(StoreUnavailable, match="BadDigest"):
            store.put("k", data)
        proxy.corrupt_request(count=1)
        store.put("k", data)  # the retry layer resent the damaged body
        assert proxy.faults_applied >= 2
        proxy.clear()
        assert store.get("k") == data
