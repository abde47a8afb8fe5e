"""Each S3 backend against moto behind the fault proxy: right data or a kvstore error in time, then recovery."""

from __future__ import annotations

import time

import pytest

import kvstore
from kvstore import KVStoreError, StoreUnavailable
from kvstore.testing.faults import FaultProxy

pytestmark = [pytest.mark.servers, pytest.mark.timeout(60)]
TIMEOUT_S = 3.0
SLACK_S = 2.5  # client teardown and scheduling on a busy 2-core machine
DATA = bytes(range(256)) * 1024  # 256 KiB: several TCP segments, so a drop lands mid-body



@pytest.fixture
def moto_bucket(s3_servers, unique_name):
    server = s3_servers.get("moto")
    bucket = unique_name("faults")
    server.create_bucket(bucket)
    return server, bucket


@pytest.fixture
def proxy(moto_bucket):
    with FaultProxy(moto_bucket[0].port) as proxy:
        yield proxy
    assert proxy.open_sockets() == 0


def open_store(moto_bucket, endpoint: str, backend: str, **extra) -> kvstore.KVStore:
    server, bucket = moto_bucket
    config = {"kvstore_backend": backend, "kvstore_timeout_s": TIMEOUT_S, "kvstore_connect_timeout_s": 1,
              "kvstore_checksum": "crc32c", "kvstore_breaker_threshold": 0, **extra}
    return kvstore.open(f"s3://{bucket}/f", server.extra_config(s3_endpoint_url=endpoint, **config))


def timed(call):
    """(result or the kvstore error raised, seconds taken)."""
    start = time.monotonic()
    try:
        result = call()
    except KVStoreError as exc:
        result = exc
    return result, time.monotonic() - start


def test_pass_through(moto_bucket, proxy, backend):
    with open_store(moto_bucket, proxy.endpoint, backend) as store:
        store.put("k", DATA)
        assert store.get("k") == DATA
        assert proxy.responses >= 2 and proxy.faults_applied == 0


@pytest.mark.parametrize("status", [503, 500])
def test_a_few_server_errors_are_retried(moto_bucket, proxy, backend, status):
    with open_store(moto_bucket, proxy.endpoint, backend) as store:
        proxy.error(status, count=2)
        store.put("k", DATA)
        proxy.error(status, count=2)
        assert store.get("k") == DATA
        assert proxy.faults_applied == 4


def test_persistent_errors_fail_in_time_and_store_nothing(moto_bucket, proxy, backend):
    with open_store(moto_bucket, proxy.endpoint, backend) as store, \
            open_store(moto_bucket, moto_bucket[0].endpoint, backend) as direct:
        proxy.error(503)
        result, took = timed(lambda: store.put("k", DATA))
        assert isinstance(result, StoreUnavailable | kvstore.StoreTimeout), result
        assert took < TIMEOUT_S + SLACK_S
        assert direct.stat("k") is None  # nothing partial was stored
        proxy.clear()
        store.put("k", DATA)
        assert direct.get("k") == DATA


@pytest.mark.parametrize("after_bytes", [0, 100_000])
def test_connection_dropped_mid_body(moto_bucket, proxy, backend, after_bytes):
    with open_store(moto_bucket, proxy.endpoint, backend) as store:
        store.put("k", DATA)
        proxy.drop(after_bytes)
        result, took = timed(lambda: store.get("k"))
        assert result == DATA or isinstance(result, KVStoreError), "partial data returned"
        assert took < TIMEOUT_S + SLACK_S
        buffer = bytearray(len(DATA))
        result, _ = timed(lambda: store.get_into("k", buffer))
        assert result == len(DATA) and buffer == DATA or isinstance(result, KVStoreError)
        proxy.clear()
        assert store.get("k") == DATA


def test_corrupted_body_is_never_returned(moto_bucket, proxy, backend):
    with open_store(moto_bucket, proxy.endpoint, backend) as store:
        store.put("k", DATA)
        proxy.corrupt()
        result, took = timed(lambda: store.get("k"))
        assert isinstance(result, kvstore.IntegrityError | KVStoreError), f"corrupt data returned: {type(result)}"
        assert took < TIMEOUT_S + SLACK_S
        proxy.clear()
        assert store.get("k") == DATA


def test_slow_server_hits_the_deadline(moto_bucket, proxy, backend):
    with open_store(moto_bucket, proxy.endpoint, backend) as store:
        store.put("k", DATA)
        proxy.delay(TIMEOUT_S + 4)
        result, took = timed(lambda: store.get("k"))
        assert result == DATA or isinstance(result, KVStoreError)
        assert took < TIMEOUT_S + SLACK_S, f"{backend} took {took:.1f} s with a {TIMEOUT_S} s deadline"
        proxy.clear()
        assert store.get("k") == DATA


def test_reset_connections_are_retried(moto_bucket, proxy, backend):
    with open_store(moto_bucket, proxy.endpoint, backend) as store:
        store.put("k", DATA)
        proxy.drop_connections()
        proxy.reset(count=2)
        result, took = timed(lambda: store.get("k"))
        assert result == DATA or isinstance(result, StoreUnavailable)
        assert took < TIMEOUT_S + SLACK_S
        assert store.get("k") == DATA


def test_breaker_opens_on_a_dead_server_and_recovers(moto_bucket, proxy, backend):
    with open_store(moto_bucket, proxy.endpoint, backend, kvstore_breaker_threshold=2, kvstore_breaker_reset_s=1,
                    kvstore_max_retries=1, kvstore_timeout_s=2) as store:
        store.put("k", DATA)
        proxy.refuse()
        errors = []
        for _ in range(3):
            result, took = timed(lambda: store.get("k"))
            assert isinstance(result, KVStoreError), result
            assert took < 2 + SLACK_S
            errors.append(str(result))
        assert "circuit open" in errors[-1]
        assert store.metrics()["breaker_state"] == "open"
        result, took = timed(lambda: store.get("k"))
        assert "circuit open" in str(result) and took < 0.1  # fails fast, no network
        proxy.clear()
        time.sleep(1.1)
        assert store.get("k") == DATA  # the half-open probe succeeds
        assert store.metrics()["breaker_state"] == "closed"


def test_server_killed_and_restarted(backend, unique_name):
    """A crashed server gives errors in time; once it is back, the same store reads its data again."""
    from kvstore.testing import servers

    reason = servers.available("seaweedfs")
    if reason:
        pytest.skip(f"seaweedfs cannot run here: {reason}")
    with servers.start("seaweedfs") as managed:  # its own server: killing the shared one would hurt others
        server, bucket = managed.server, unique_name("crash")
        server.create_bucket(bucket)
        with open_store((server, bucket), server.endpoint, backend) as store:
            store.put("k", DATA)
            managed.kill()
            result, took = timed(lambda: store.get("k"))
            assert isinstance(result, KVStoreError), f"read from a dead server returned {type(result).__name__}"
            assert took < TIMEOUT_S + SLACK_S
            result, took = timed(lambda: store.put("k2", DATA))
            assert isinstance(result, KVStoreError) and took < TIMEOUT_S + SLACK_S
            managed.restart()
            assert store.get("k") == DATA
            assert store.get("k2") is None  # the failed put left nothing behind
            store.put("k2", DATA)
            assert store.get("k2") == DATA
