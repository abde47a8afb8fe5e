"""Pieces the S3 backends built on asyncio clients share: the bucket probe, bounded async calls, upload checksums.

* ``BucketProbe``: a HEAD 404 has no body, so it cannot tell a missing key from a missing bucket.
  One probe per store settles it; any request that reached the bucket proves it too, and a
  ``NoSuchBucket`` answer forgets it again. A miss then costs no second request.
* ``run_bounded``: both clients have async APIs; running a call on an event loop lets us end it
  at the operation's deadline, or when the caller's buffer lease is revoked, and cancel the
  coroutine so that nothing keeps running (or writing) after the call returned.
* ``crc32c_b64``: the CRC32C the integrity layer put in the metadata, the way S3 wants it in
  ``x-amz-checksum-crc32c``, so that a server that validates refuses a body damaged on the way.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kvstore.backends import call
from kvstore.errors import StoreTimeout
from kvstore.layers.integrity import CRC_KEY, crc32c

# How long a timed-out or abandoned call waits for its coroutine to wind down (close its
# connection) before it returns anyway: the coroutine is cancelled, so it writes nothing more.
CANCEL_GRACE_S = 0.5


class BucketProbe:
    """Whether this store's bucket is known to exist, settled by at most one probe at a time."""

    def __init__(self) -> None:
        self._seen = False
        self._lock = threading.Lock()

    def seen(self) -> None:
        """A request reached the bucket: it exists."""
        self._seen = True

    def forget(self) -> None:
        """The server said ``NoSuchBucket``: probe again next time (it may be created meanwhile)."""
        self._seen = False

    def confirm(self, probe: Callable[[], object]) -> None:
        """After a bare 404: return when the bucket exists; ``probe`` raises (``BucketNotFound``, ...) otherwise."""
        if self._seen:
            return
        with self._lock:
            if not self._seen:
                probe()
                self._seen = True


class LoopThread:
    """An event loop on a daemon thread of its own, for a client whose async API we drive from blocking calls."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Cancel what still runs on the loop and stop it. Idempotent."""
        if self.loop.is_closed() or not self._thread.is_alive():
            return

        def stop() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.call_later(0.05, self.loop.stop)

        self.loop.call_soon_threadsafe(stop)
        self._thread.join(2)


def run_bounded(loop: asyncio.AbstractEventLoop, coro: Awaitable[Any], what: str, timeout_s: float) -> Any:
    """Run ``coro`` on ``loop`` within what is left of the current call's deadline.

    At the deadline it raises ``StoreTimeout``; when the caller's buffer lease is revoked
    (cancel, ``wait_for`` timeout, ``close()``) it raises ``CallAbandoned``. Either way the
    coroutine is cancelled first, and given ``CANCEL_GRACE_S`` to end, so no request of ours
    goes on in the background. The coroutine's own exceptions come through unchanged.
    """
    budget = call.remaining(timeout_s)
    ended = threading.Event()

    async def guarded() -> Any:
        try:
            return await coro
        finally:
            ended.set()

    future = asyncio.run_coroutine_threadsafe(guarded(), loop)
    lease = call.lease()
    if lease is not None:
        lease.on_revoke(future.cancel)
    try:
        return future.result(timeout=budget)
    except TimeoutError as exc:
        if future.done() and not future.cancelled():
            raise  # the coroutine's own timeout (a socket read), not our deadline
        future.cancel()
        ended.wait(CANCEL_GRACE_S)
        raise StoreTimeout(f"{what}: no answer within the deadline ({timeout_s:g} s)") from exc
    except concurrent.futures.CancelledError as exc:
        ended.wait(CANCEL_GRACE_S)
        raise call.CallAbandoned(f"{what}: the call was abandoned") from exc


def crc32c_b64(metadata: Mapping[str, str]) -> str | None:
    """``x-amz-checksum-crc32c`` (base64 of the 4 big-endian bytes) for the CRC32C in ``metadata``, if any."""
    value = metadata.get(CRC_KEY)
    if value is None:
        return None
    return base64.b64encode(int(value, 16).to_bytes(4, "big")).decode("ascii")


def crc32c_b64_of(data: Any) -> str:
    """``x-amz-checksum-crc32c`` of ``data`` (one part of a multipart upload)."""
    return base64.b64encode(crc32c(data).to_bytes(4, "big")).decode("ascii")
