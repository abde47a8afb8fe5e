"""The layers (retry, breaker, integrity, metrics) around a real memory backend that fails on purpose."""

from __future__ import annotations

import threading
import time

import pytest

from kvstore import AuthError, IntegrityError, StoreTimeout, StoreUnavailable, resolve
from kvstore.backends.memory import MemoryBackend
from kvstore.layers import wrap
from kvstore.layers.integrity import CRC_KEY
from kvstore.store import KVStore


class FlakyBackend(MemoryBackend):
    """A memory backend whose next ``fail`` calls raise ``error``, and whose reads can come back bit-flipped."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.fail = 0
        self.error: Exception = StoreUnavailable("injected 503", status=503)
        self.flip_reads = 0
        self.calls = 0
        self._flaky_lock = threading.Lock()

    def _maybe_fail(self) -> None:
        with self._flaky_lock:
            self.calls += 1
            if self.fail > 0:
                self.fail -= 1
                raise self.error

    def put(self, name, data, metadata, *, if_absent=False):
        self._maybe_fail()
        return super().put(name, data, metadata, if_absent=if_absent)

    def get_into(self, name, buffer, on_chunk=None):
        self._maybe_fail()
        result = super().get_into(name, buffer, on_chunk)
        if result is not None and self.flip_reads > 0:
            self.flip_reads -= 1
            buffer[result.size // 2] ^= 0x01
        return result

    def get(self, name):
        self._maybe_fail()
        found = super().get(name)
        if found is not None and self.flip_reads > 0:
            self.flip_reads -= 1
            data = bytearray(found[0])
            data[len(data) // 2] ^= 0x01
            return data, found[1]
        return found

    def head(self, name):
        self._maybe_fail()
        return super().head(name)


def open_flaky(unique_name, **extra) -> tuple[KVStore, FlakyBackend]:
    config = resolve(f"memory://{unique_name('layers')}", {"kvstore_checksum": "crc32c", "kvstore_timeout_s": 2,
                                                           "kvstore_breaker_threshold": 0, **extra})
    backend = FlakyBackend(config)
    return KVStore(config, wrap(backend, config)), backend


def test_transient_errors_are_retried_and_counted(unique_name):
    store, backend = open_flaky(unique_name, kvstore_max_retries=4)
    with store:
        backend.fail = 3
        store.put("k", b"value")
        assert store.get("k") == b"value"
        ops = store.metrics()["operations"]
        assert ops["put"]["retries"] == 3
        assert ops["put"]["calls"] == 1 and "errors" not in ops["put"]
        assert backend.calls == 5  # 4 put attempts and one get


def test_retries_stop_at_max_retries(unique_name):
    store, backend = open_flaky(unique_name, kvstore_max_retries=2)
    with store:
        backend.fail = 10
        with pytest.raises(StoreUnavailable):
            store.put("k", b"v")
        assert backend.calls == 3
        assert store.metrics()["operations"]["put"]["errors.StoreUnavailable"] == 1


def test_retries_stop_at_the_deadline(unique_name):
    store, backend = open_flaky(unique_name, kvstore_max_retries=1000, kvstore_timeout_s=0.5)
    with store:
        backend.fail = 10**6
        start = time.monotonic()
        with pytest.raises(StoreTimeout, match="gave up"):
            store.put("k", b"v")
        elapsed = time.monotonic() - start
        assert elapsed < 0.5 + 0.3, elapsed
        assert backend.calls > 2


@pytest.mark.parametrize("error", [AuthError("403 AccessDenied"), StoreUnavailable("400", retryable=False, status=400)],
                         ids=["auth", "non-retryable"])
def test_permanent_errors_are_not_retried(unique_name, error):
    store, backend = open_flaky(unique_name)
    with store:
        backend.fail, backend.error = 5, error
        with pytest.raises(type(error)):
            store.put("k", b"v")
        assert backend.calls == 1
        assert "retries" not in store.metrics()["operations"]["put"]


def breaker_store(unique_name):
    return open_flaky(unique_name, kvstore_breaker_threshold=3, kvstore_breaker_reset_s=0.3, kvstore_max_retries=0)


def test_breaker_opens_fails_fast_half_opens_and_closes(unique_name):
    store, backend = breaker_store(unique_name)
    with store:
        store.put("k", b"v")
        backend.fail, backend.error = 3, StoreUnavailable("connection refused", connection=True)
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                store.get("k")
        assert store.metrics()["breaker_state"] == "open"
        calls = backend.calls
        with pytest.raises(StoreUnavailable, match="circuit open"):
            store.get("k")
        assert backend.calls == calls  # refused without touching the backend
        time.sleep(0.35)
        assert store.metrics()["breaker_state"] == "half-open"
        assert store.get("k") == b"v"  # the probe succeeds and closes it
        assert store.metrics()["breaker_state"] == "closed"
        assert store.metrics()["operations"]["get"]["breaker_opened"] == 1


def test_breaker_failed_probe_reopens(unique_name):
    store, backend = breaker_store(unique_name)
    with store:
        backend.fail, backend.error = 4, StoreUnavailable("connection reset", connection=True)
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                store.exists("k")
        time.sleep(0.35)
        with pytest.raises(StoreUnavailable, match="connection reset"):
            store.exists("k")  # the probe fails
        assert store.metrics()["breaker_state"] == "open"
        time.sleep(0.35)
        assert store.exists("k") is False


def test_breaker_ignores_answers_that_are_not_connection_failures(unique_name):
    store, backend = breaker_store(unique_name)
    with store:
        backend.fail, backend.error = 10, StoreUnavailable("503 SlowDown", status=503)
        for _ in range(10):
            with pytest.raises(StoreUnavailable, match="SlowDown"):
                store.exists("k")
        assert store.metrics()["breaker_state"] == "closed"


def test_breaker_recovers_when_the_probe_gets_a_non_connection_error(unique_name):
    """A probe answered with e.g. 403 proves the endpoint is reachable: the breaker must not stay stuck."""
    store, backend = breaker_store(unique_name)
    with store:
        backend.fail, backend.error = 3, StoreUnavailable("connection refused", connection=True)
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                store.exists("k")
        time.sleep(0.35)
        backend.fail, backend.error = 1, AuthError("403 AccessDenied")
        with pytest.raises(AuthError):
            store.exists("k")
        assert store.exists("k") is False


@pytest.mark.parametrize("read", ["get", "get_into"])
def test_integrity_catches_a_flipped_byte(unique_name, read):
    store, backend = open_flaky(unique_name)
    with store:
        data = bytes(range(256)) * 16
        store.put("k", data)
        assert store.stat("k").metadata[CRC_KEY]
        backend.flip_reads = 100
        with pytest.raises(IntegrityError, match="CRC32C"):
            store.get("k") if read == "get" else store.get_into("k", bytearray(len(data)))
        backend.flip_reads = 0
        assert store.get("k") == data


def test_integrity_leaves_objects_without_a_checksum_alone(unique_name):
    store, backend = open_flaky(unique_name)
    with store:
        backend.put(store.name_of("foreign"), memoryview(b"written by someone else"), {})
        assert store.get("foreign") == b"written by someone else"


def test_metrics_count_calls_bytes_misses_and_errors(unique_name):
    store, backend = open_flaky(unique_name)
    with store:
        store.put("a", b"x" * 1000)
        store.put("b", b"y" * 24)
        assert store.get_into("a", bytearray(2000)) == 1000
        assert store.get("nope") is None
        backend.fail, backend.error = 1, AuthError("403")
        with pytest.raises(AuthError):
            store.get("a")
        snap = store.metrics()
        ops = snap["operations"]
        assert ops["put"]["calls"] == 2 and ops["put"]["bytes_out"] == 1024
        assert ops["get_into"]["bytes_in"] == 1000
        assert ops["get"]["misses"] == 1 and ops["get"]["errors.AuthError"] == 1 and ops["get"]["calls"] == 2
        assert sum(ops["put"]["latency_buckets"].values()) == 2
        assert ops["put"]["latency_sum_s"] > 0


def test_prometheus_export(unique_name):
    prometheus_client = pytest.importorskip("prometheus_client")
    from kvstore.layers.prometheus import StoreCollector

    store, backend = open_flaky(unique_name, kvstore_breaker_threshold=3, kvstore_max_retries=2)
    registry = prometheus_client.CollectorRegistry()
    registry.register(StoreCollector(store, name="l2"))
    with store:
        store.put("a", b"x" * 100)
        backend.fail = 1
        assert store.get("a") == b"x" * 100
        assert store.get("missing") is None
        backend.fail, backend.error = 1, AuthError("403")
        with pytest.raises(AuthError):
            store.exists("a")
        value = registry.get_sample_value
        assert value("kvstore_operations_total", {"store": "l2", "op": "put"}) == 1
        assert value("kvstore_operations_total", {"store": "l2", "op": "get"}) == 2
        assert value("kvstore_retries_total", {"store": "l2", "op": "get"}) == 1
        assert value("kvstore_misses_total", {"store": "l2", "op": "get"}) == 1
        assert value("kvstore_errors_total", {"store": "l2", "op": "head", "error": "AuthError"}) == 1
        assert value("kvstore_bytes_total", {"store": "l2", "op": "put", "direction": "out"}) == 100
        assert value("kvstore_operation_seconds_count", {"store": "l2", "op": "get"}) == 2
        assert value("kvstore_operation_seconds_bucket", {"store": "l2", "op": "get", "le": "+Inf"}) == 2
        assert value("kvstore_breaker_state", {"store": "l2", "state": "closed"}) == 1
        assert value("kvstore_breaker_state", {"store": "l2", "state": "open"}) == 0
        text = prometheus_client.generate_latest(registry).decode()
        assert 'kvstore_operation_seconds_bucket{le="0.001",op="put",store="l2"}' in text
