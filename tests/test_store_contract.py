"""The store's own promises, on the embedded memory store: buffers, reserved metadata, deadlines, close."""

from __future__ import annotations

import threading
import time

import pytest

import kvstore
from kvstore import InvalidKey, KVStoreError, PreconditionFailed, StoreUnavailable
from kvstore.backends import call
from kvstore.backends.base import Backend
from kvstore.layers.base import Layer
from kvstore.layers.metrics import MetricsLayer
from kvstore.layers.retry import RetryLayer

np = pytest.importorskip("numpy")


@pytest.fixture
def store(unique_name):
    with kvstore.open(f"memory://{unique_name('contract')}") as store:
        yield store


def test_a_fortran_ordered_array_is_refused_like_any_non_contiguous_buffer(store):
    fortran = np.asfortranarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    strided = np.arange(24, dtype=np.uint8)[::2]
    for bad in (fortran, strided):
        with pytest.raises(ValueError, match="C-contiguous"):
            store.put("k", bad)
    store.put("k", b"x" * 12)
    for bad in (np.asfortranarray(np.zeros((3, 4), dtype=np.uint8)), np.zeros(24, dtype=np.uint8)[::2]):
        with pytest.raises(ValueError, match="C-contiguous"):
            store.get_into("k", bad)


def test_the_kvstore_metadata_namespace_is_reserved(store):
    with pytest.raises(InvalidKey, match="kvstore's own"):
        store.put("k", b"data", {"kvstore-crc32c": "00000000"})
    store.put("k", b"data", {"kvstore2-x": "fine", "dtype": "bf16"})
    assert store.stat("k").metadata["dtype"] == "bf16"


def test_calls_waiting_behind_max_inflight_fail_with_a_store_error_on_close(unique_name):
    """A call queued behind the in-flight bound is woken by close() with a KVStoreError, never left asleep."""
    store = kvstore.open(f"memory://{unique_name('limit')}", {"kvstore_max_inflight": 1})
    store.put("k", b"v")
    started, release = threading.Event(), threading.Event()
    inner = store.backend.unwrap()
    original = inner.head

    def slow_head(name):  # holds the only slot until released
        started.set()
        release.wait(5)
        return original(name)

    inner.head = slow_head
    outcomes: list[object] = []

    def stat() -> None:
        try:
            outcomes.append(store.stat("k"))
        except KVStoreError as exc:
            outcomes.append(exc)

    first = threading.Thread(target=stat)
    first.start()
    started.wait(5)
    waiting = threading.Thread(target=stat)
    waiting.start()
    time.sleep(0.2)
    store.close()
    waiting.join(2)
    assert not waiting.is_alive(), "a queued call slept through close()"
    release.set()
    first.join(5)
    assert any(isinstance(o, KVStoreError) and "closed" in str(o) for o in outcomes), outcomes


class _Flaky(Layer):
    """Loses the answer of the first put after the object was stored: what a cut connection does."""

    def __init__(self, inner: Backend, config) -> None:
        super().__init__(inner, config)
        self.lost = 0

    def put(self, name, data, metadata, *, if_absent=False):
        self.inner.put(name, data, metadata, if_absent=if_absent)
        if not self.lost:
            self.lost += 1
            raise StoreUnavailable("connection reset after the request was sent", retryable=True, connection=True)


def _retrying(store) -> tuple[RetryLayer, _Flaky]:
    flaky = _Flaky(store.backend.unwrap(), store.config)
    return RetryLayer(flaky, store.config, MetricsLayer.new_registry()), flaky


def test_a_conditional_put_whose_answer_was_lost_is_not_reported_as_a_conflict(store):
    retry, flaky = _retrying(store)
    retry.put("n", memoryview(b"payload"), {"dtype": "bf16"}, if_absent=True)  # the retry finds our own object
    assert flaky.lost == 1
    assert store.get("n") == b"payload"


def test_a_conditional_put_still_loses_to_another_writers_object(store):
    store.put("n", b"someone else's")
    retry, flaky = _retrying(store)
    with pytest.raises(PreconditionFailed):
        retry.put("n", memoryview(b"payload"), {}, if_absent=True)
    assert store.get("n") == b"someone else's"


class _Slow(Layer):
    """An endpoint that answers slowly with a retryable error, then stalls: each attempt uses its budget."""

    def __init__(self, inner: Backend, config) -> None:
        super().__init__(inner, config)
        self.budgets: list[float] = []

    def head(self, name):
        budget = call.remaining(self.config.timeout_s)
        self.budgets.append(budget)
        time.sleep(min(budget, 0.6))
        raise StoreUnavailable("503 SlowDown", retryable=True, status=503)


def test_each_attempt_gets_what_is_left_of_one_deadline(unique_name):
    with kvstore.open(f"memory://{unique_name('deadline')}", {"kvstore_timeout_s": 1.5, "kvstore_max_retries": 10}) as store:
        slow = _Slow(store.backend.unwrap(), store.config)
        retry = RetryLayer(slow, store.config, MetricsLayer.new_registry())
        start = time.monotonic()
        with pytest.raises(kvstore.StoreTimeout):
            retry.head("k")
        took = time.monotonic() - start
    assert took < 1.5 + 0.3, f"the call outlived its deadline: {took:.2f} s"
    assert len(slow.budgets) >= 2 and all(a > b for a, b in zip(slow.budgets, slow.budgets[1:])), slow.budgets

