"""The retry layer's promises, through a real server behind the fault proxy, with every S3 backend.

- A create-if-absent put whose answer was lost is retried; the retry meets the object the first
  attempt stored, and the writer that stored it is told it succeeded, not ``PreconditionFailed``.
- A delete whose answer was lost (or answered by an error after the server removed the
  objects, as s3rver does) still tells the caller which objects existed.
- One deadline per operation: a slow failing first attempt leaves the next attempt only what is
  left of ``timeout_s``, so no call outlives ``timeout_s`` by more than the documented grace.
"""

from __future__ import annotations

import contextlib
import time

import pytest

import kvstore
from kvstore import PreconditionFailed, StoreTimeout
from kvstore.testing.faults import Fault, FaultProxy

pytestmark = [pytest.mark.servers, pytest.mark.timeout(120)]
TIMEOUT_S = 2.0
# docs/reliability.md, "One deadline per operation": how long past timeout_s a call may end.
GRACE_S = 1.0



@pytest.fixture
def proxied(s3_servers, unique_name, backend):
    server = s3_servers.get("moto")
    bucket = unique_name("retry")
    server.create_bucket(bucket)
    with FaultProxy(server.port) as proxy:
        extra = server.extra_config(s3_endpoint_url=proxy.endpoint, kvstore_backend=backend,
                                    kvstore_timeout_s=TIMEOUT_S, kvstore_breaker_threshold=0, kvstore_max_retries=3)
        with kvstore.open(f"s3://{bucket}/r", extra) as store:
            # A client's first request opens its session and connection, which on a loaded host can
            # take most of the 2 s deadline: do it before the test, whose setup writes are not under test.
            for _ in range(3):
                with contextlib.suppress(StoreTimeout):
                    store.exists("warm-up")
                    break
            yield store, proxy


def test_if_absent_put_whose_answer_was_lost_reports_success(proxied):
    store, proxy = proxied
    proxy.lose(method="PUT", count=1)
    store.put("mine", b"the first writer", if_absent=True)  # stored by attempt 1, met by attempt 2
    assert proxy.faults_applied == 1, "no answer was lost: the test proves nothing"
    assert store.get("mine") == b"the first writer"
    # Another writer's object is still another writer's: refused, as before.
    with pytest.raises(PreconditionFailed):
        store.put("mine", b"a second writer", if_absent=True)


def test_if_absent_put_over_another_writers_object_after_a_lost_answer_is_refused(proxied):
    store, proxy = proxied
    store.put("theirs", b"someone else's bytes")
    proxy.lose(method="PUT", count=1)
    with pytest.raises(PreconditionFailed):
        store.put("theirs", b"ours, never stored", if_absent=True)
    assert store.get("theirs") == b"someone else's bytes"


def test_delete_many_whose_answer_was_lost_still_reports_what_existed(proxied):
    store, proxy = proxied
    store.put("a", b"1")
    store.put("b", b"2")
    proxy.lose(method="POST", count=1)  # DeleteObjects: the server deletes, the answer is lost
    assert store.delete_many(["a", "b", "never"]) == [True, True, False]
    assert proxy.faults_applied == 1, "no answer was lost: the test proves nothing"
    assert not store.exists("a") and not store.exists("b")


def test_delete_whose_answer_was_lost_still_reports_that_it_existed(proxied, backend):
    store, proxy = proxied
    store.put("a", b"1")
    # obstore deletes even one object with DeleteObjects (a POST); the others send DELETE.
    proxy.lose(method="POST" if backend == "obstore" else "DELETE", count=1)
    assert store.delete("a") is True
    assert proxy.faults_applied == 1, "no answer was lost: the test proves nothing"
    assert not store.exists("a") and store.delete("a") is False


@pytest.mark.parametrize("call", ["get", "exists", "put"])
def test_a_slow_503_then_a_stall_ends_within_the_deadline(proxied, call):
    store, proxy = proxied
    store.put("k", b"x" * 1024)
    # The first answer is a 503 that takes most of the deadline; every later request is stalled.
    proxy.set(Fault("error", status=503, remaining=1, wait_s=TIMEOUT_S * 0.6), Fault("stall"))
    started = time.monotonic()
    try:
        with pytest.raises(StoreTimeout):
            {"get": lambda: store.get("k"), "exists": lambda: store.exists("k"),
             "put": lambda: store.put("k", b"y" * 1024)}[call]()
        elapsed = time.monotonic() - started
    finally:
        proxy.release()
    assert proxy.faults_applied >= 2, "the call was not retried after the 503: the test proves nothing"
    assert elapsed <= TIMEOUT_S + GRACE_S, f"{call} took {elapsed:.2f} s with timeout_s {TIMEOUT_S}"
