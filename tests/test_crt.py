"""The awscrt backend against a real moto server (SigV4 enforced), directly and through kvstore.open."""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc

import numpy as np
import pytest
from kvstore_crt.backend import CANCEL_GRACE_S, SHUTDOWN_WAIT_S, CrtBackend, default_io_threads
from kvstore_crt.http import Sink as _Sink
from kvstore_crt.http import encode_path, encode_query

import kvstore
from kvstore.config import resolve
from kvstore.errors import (
    AuthError,
    BucketNotFound,
    BufferTooSmall,
    IntegrityError,
    PreconditionFailed,
    StoreTimeout,
    StoreUnavailable,
)
from kvstore.testing.faults import FaultProxy

pytestmark = pytest.mark.servers

MiB = 1024 * 1024
BIG = 64 * MiB  # above the 8 MiB part size: multipart upload and parallel ranged GETs


@pytest.fixture(scope="module")
def moto(s3_servers):
    return s3_servers.get("moto")


@pytest.fixture(scope="module")
def bucket(moto):
    import uuid

    name = f"crt-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(name)
    return name


def open_store(moto, bucket, prefix="p", **overrides):
    return kvstore.open(moto.url(bucket, prefix), moto.extra_config(kvstore_backend="crt", **overrides))


def raw_backend(bucket, endpoint_server, endpoint_url=None, **overrides) -> CrtBackend:
    """A bare backend (no retry, integrity or breaker layers), optionally reached through another endpoint."""
    extra = endpoint_server.extra_config(kvstore_backend="crt", **overrides)
    if endpoint_url:
        extra["s3_endpoint_url"] = endpoint_url
    return CrtBackend(resolve(f"s3://{bucket}", extra))


@pytest.fixture(scope="module")
def store(moto, bucket):
    with open_store(moto, bucket) as s:
        yield s


@pytest.fixture(scope="module")
def big_object(store):
    data = np.random.default_rng(7).integers(0, 256, BIG, dtype=np.uint8)
    store.put("big", data, {"kind": "big"})
    return data


@pytest.fixture
def proxy(moto):
    with FaultProxy(moto.port) as p:
        yield p


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- wire encoding ------------------------------------------------------------------------------
def test_path_and_query_encoding():
    assert encode_path("a b/c%d+e~f_g.h-i/ü") == "a%20b/c%25d%2Be~f_g.h-i/%C3%BC"
    assert encode_query([("list-type", "2"), ("prefix", "a/b c+")]) == "list-type=2&prefix=a%2Fb%20c%2B"
    assert encode_query([("delete", None)]) == "delete"


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 5 * MiB + 1])
def test_round_trip(store, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    store.put(f"rt-{size}", data)
    assert store.get(f"rt-{size}") == data
    buffer = bytearray(size + 3)
    assert store.get_into(f"rt-{size}", buffer) == size
    assert buffer[:size] == data
    assert store.stat(f"rt-{size}").size == size


def test_multipart_round_trip(store, big_object):
    info = store.stat("big")
    assert info.size == BIG
    assert info.etag.endswith("-8"), "a 64 MiB put with 8 MiB parts is a multipart upload"
    assert store.get("big") == big_object.tobytes()


@pytest.mark.parametrize("key", ["ü€ unicode", "with space", "per%cent", "plus+sign", "a/b/c", "tilde~", "k" * 1000])
def test_awkward_keys(store, key):
    store.put(key, b"v:" + key.encode())
    assert store.get(key) == b"v:" + key.encode()
    assert key in list(store.list(key[:4]))
    assert store.delete(key) is True
    assert store.get(key) is None


def test_metadata_round_trip(store):
    store.put("meta", b"x", {"shape": "1,2,16", "dtype": "bfloat16"})
    info = store.stat("meta")
    assert info.metadata["shape"] == "1,2,16" and info.metadata["dtype"] == "bfloat16"
    assert info.last_modified and abs(info.last_modified - time.time()) < 300
    backend = store.backend
    result = backend.get_into(store.name_of("meta"), memoryview(bytearray(1)))
    assert result.metadata["dtype"] == "bfloat16"


def test_misses_and_deletes(store):
    assert store.get("absent") is None
    assert store.get_into("absent", bytearray(4)) is None
    assert store.stat("absent") is None
    assert store.delete("absent") is False
    store.put("present", b"1")
    assert store.delete_many(["present", "absent"]) == [True, False]
    assert store.get("present") is None


def test_conditional_put(store):
    store.put("once", b"1", if_absent=True)
    with pytest.raises(PreconditionFailed):
        store.put("once", b"2", if_absent=True)
    assert store.get("once") == b"1"


def test_listing_over_a_thousand_keys(moto, bucket):
    with open_store(moto, bucket, "many", kvstore_checksum="none") as s:
        keys = [f"dir/{i:05d}" for i in range(1010)]
        s.put_many((k, b"x") for k in keys)
        s.put("dirx", b"outside the prefix")
        assert list(s.list("dir/")) == keys
        assert all(info.size == 1 for info in s.scan("dir/"))
        assert s.delete_many(keys + ["dir/none"]) == [True] * 1010 + [False]  # two DeleteObjects batches
        assert list(s.list("dir/")) == []


def test_io_threads_zero_starts_at_least_four_event_loops(moto, bucket, monkeypatch):
    """The CRT's own default (half the processors) starves a small host; 0 means max(4, CPUs) here.

    The real EventLoopGroup is built; the spy only records its size (loop threads name themselves
    asynchronously, so counting them from /proc races).
    """
    from awscrt import io as crt_io

    sizes = []

    class Recording(crt_io.EventLoopGroup):
        def __init__(self, num_threads=None, *args, **kwargs):
            sizes.append(num_threads)
            super().__init__(num_threads, *args, **kwargs)

    monkeypatch.setattr(crt_io, "EventLoopGroup", Recording)
    for asked in (0, 3):
        with open_store(moto, bucket, s3_num_io_threads=asked) as store:
            store.put("loops", b"x")
    assert sizes == [default_io_threads(), 3]
    assert 4 <= default_io_threads() <= 16


# -- no full-size intermediate copy --------------------------------------------------------------
def _peak_during(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_get_into_numpy_without_full_copy(store, big_object):
    target = np.zeros(BIG, dtype=np.uint8)
    peak = _peak_during(lambda: store.get_into("big", target))
    assert np.array_equal(target, big_object)
    assert peak < 3 * store.config.part_size < BIG, f"peak {peak / MiB:.1f} MiB"


@pytest.mark.lmcache
def test_get_into_torch_without_full_copy(store, big_object):
    torch = pytest.importorskip("torch")
    target = torch.zeros(BIG // 2, dtype=torch.bfloat16)
    peak = _peak_during(lambda: store.get_into("big", target))
    assert np.array_equal(target.view(torch.uint8).numpy(), big_object)
    assert peak < 3 * store.config.part_size < BIG, f"peak {peak / MiB:.1f} MiB"


def test_read_only_buffer_is_refused_even_when_pieces_are_watched():
    """The piece-by-piece copy needs the buffer's address: a read-only one must fail the call, not crash."""
    seen = []
    sink = _Sink("k", memoryview(b"x" * 8), lambda at, piece: seen.append(at))
    sink.on_headers(200, [("Content-Length", "2")])
    with pytest.raises(TypeError):
        sink.on_body(chunk=b"ab", offset=0)
    assert seen == []


def test_buffer_too_small_never_writes_past_its_end(store):
    store.put("nine", b"123456789")
    backing = bytearray(b"\xee" * 16)
    with pytest.raises(BufferTooSmall):
        store.backend.get_into(store.name_of("nine"), memoryview(backing)[:8])
    assert backing[8:] == b"\xee" * 8


# -- errors ---------------------------------------------------------------------------------------
def test_wrong_keys_are_an_auth_error(moto, bucket):
    with open_store(moto, bucket, aws_secret_access_key="not-the-secret") as s:
        with pytest.raises(AuthError):
            s.put("k", b"data")
        with pytest.raises(AuthError):
            s.get("k")
        with pytest.raises(AuthError):
            s.stat("k")
        with pytest.raises(AuthError):
            list(s.list())
    # the secret never shows in what the error says
    with open_store(moto, bucket, aws_secret_access_key="not-the-secret") as s:
        with pytest.raises(AuthError) as info:
            s.put("k", b"data")
        assert "not-the-secret" not in str(info.value)


def test_missing_bucket(moto):
    with open_store(moto, "no-such-bucket-crt") as s:
        with pytest.raises(BucketNotFound):
            s.put("k", b"data")  # an HTTP error is never a successful put
        with pytest.raises(BucketNotFound):
            s.get("k")
        with pytest.raises(BucketNotFound):
            list(s.list())


def test_dead_endpoint_fails_within_the_timeout(moto, bucket):
    extra = moto.extra_config(kvstore_backend="crt", kvstore_timeout_s=3, kvstore_connect_timeout_s=1,
                              kvstore_max_retries=1)
    extra["s3_endpoint_url"] = f"http://127.0.0.1:{closed_port()}"
    with kvstore.open(f"s3://{bucket}/p", extra) as s:
        start = time.monotonic()
        with pytest.raises((StoreUnavailable, StoreTimeout)) as info:
            s.get("k")
        assert time.monotonic() - start < 3 + CANCEL_GRACE_S + 1
        if isinstance(info.value, StoreUnavailable):
            assert info.value.connection


def test_server_error_is_never_success(moto, bucket, proxy):
    backend = raw_backend(bucket, moto, proxy.endpoint)
    try:
        proxy.error(503)
        with pytest.raises(StoreUnavailable) as info:
            backend.put("err", memoryview(b"data"), {})
        assert info.value.retryable and info.value.status == 503
        with pytest.raises(StoreUnavailable):
            backend.get_into("err", memoryview(bytearray(4)))
    finally:
        backend.close()


def test_short_body_is_never_success(moto, bucket, proxy, store):
    store.backend.put("short", memoryview(bytes(200_000)), {})
    backend = raw_backend(bucket, moto, proxy.endpoint)
    try:
        proxy.drop(after_bytes=1000)
        with pytest.raises((StoreUnavailable, IntegrityError)):
            backend.get_into("short", memoryview(bytearray(200_000)))
        with pytest.raises((StoreUnavailable, IntegrityError)):
            backend.get("short")
    finally:
        backend.close()


def test_slow_answer_times_out_and_is_cancelled(moto, bucket, proxy):
    backend = raw_backend(bucket, moto, proxy.endpoint, kvstore_timeout_s=1)
    try:
        proxy.delay(3, count=1)
        start = time.monotonic()
        with pytest.raises(StoreTimeout):
            backend.head("slow")
        assert time.monotonic() - start < 1 + CANCEL_GRACE_S + 0.5
        assert not backend._inflight
    finally:
        backend.close()


def test_callback_exception_fails_the_call(store, monkeypatch):
    store.put("cb", b"payload")

    def explode(self, chunk, offset, **_):
        raise RuntimeError("raised inside on_body")

    monkeypatch.setattr(_Sink, "on_body", explode)
    with pytest.raises(RuntimeError, match="inside on_body"):
        store.backend.get_into(store.name_of("cb"), memoryview(bytearray(16)))


# -- lifecycle and concurrency ----------------------------------------------------------------------
def test_close_with_requests_in_flight_is_bounded(moto, bucket, proxy):
    backend = raw_backend(bucket, moto, proxy.endpoint, kvstore_timeout_s=20)
    proxy.delay(3)
    outcomes: list[object] = []

    def read():
        try:
            outcomes.append(backend.get("slow"))
        except Exception as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    shutdown = backend._client.shutdown_event
    start = time.monotonic()
    backend.close()
    assert time.monotonic() - start < CANCEL_GRACE_S + SHUTDOWN_WAIT_S + 1
    assert shutdown.is_set(), "cancelled requests must not keep the client alive"
    for t in threads:
        t.join(CANCEL_GRACE_S + 1)
        assert not t.is_alive()
    assert len(outcomes) == 4 and all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
    backend.close()  # idempotent
    with pytest.raises(StoreUnavailable):
        backend.head("anything")


def test_batch_larger_than_max_inflight(moto, bucket):
    with open_store(moto, bucket, "batch", kvstore_max_inflight=4) as s:
        keys = [f"b{i}" for i in range(16)]
        s.put_many((k, k.encode() * 1000) for k in keys)
        assert s.get_many(keys) == [k.encode() * 1000 for k in keys]
        buffers = [bytearray(4000) for _ in keys]
        assert s.get_into_many(keys, buffers) == [len(k) * 1000 for k in keys]


def test_virtual_hosted_addressing(moto, bucket):
    from kvstore.testing import servers

    if not servers.virtual_hosting_works():
        pytest.skip("bucket.localhost names do not resolve to loopback here")
    extra = moto.extra_config(kvstore_backend="crt", s3_addressing_style="virtual",
                              s3_endpoint_url=f"http://localhost:{moto.port}")
    with kvstore.open(f"s3://{bucket}/virt", extra) as s:
        assert s.config.addressing == "virtual"
        s.put("a b/ü", b"hosted")
        assert s.get("a b/ü") == b"hosted"
        assert list(s.list()) == ["a b/ü"]
        assert s.delete("a b/ü") is True
