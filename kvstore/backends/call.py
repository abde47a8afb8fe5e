"""What one store call carries down to the backend: its deadline and the lease on the caller's buffer.

``KVStore`` opens a ``Call`` for every operation; the retry layer reads ``remaining()`` so that
each attempt gets what is left of one deadline, and a backend writes the caller's buffer only
through ``Call.lease`` (``copy_into`` / ``writing``). Cancelling an async read, a timeout or
``close()`` revokes the lease: once ``revoke()`` has returned, no byte lands in that buffer any
more, whichever thread the transfer runs on (LMCache frees the buffer right after a cancel).

The current call lives in a context variable, so it follows the worker thread that runs the
operation; a backend whose transfer completes on threads of its own (awscrt's callbacks) takes
``current()`` when it starts the request and keeps it.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator

from kvstore.errors import KVStoreError


class CallAbandoned(KVStoreError):
    """The caller gave up on this call (cancelled, timed out, or the store closed): nothing may be written."""


class BufferLease:
    """The revocable right to write a caller's buffer. Writes hold a lock that ``revoke`` takes too."""

    __slots__ = ("_lock", "_revoked", "_reason", "_on_revoke")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._revoked = False
        self._reason = ""
        self._on_revoke: list[Callable[[], object]] = []

    @property
    def revoked(self) -> bool:
        return self._revoked

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the buffer for one write; raises ``CallAbandoned`` once revoked.

        Keep what runs inside short and local (a memcpy, a read from a local file): ``revoke``
        waits for it. Never wait on the network while holding it.
        """
        with self._lock:
            if self._revoked:
                raise CallAbandoned(self._reason or "the call was abandoned")
            yield

    def copy_into(self, dst: memoryview, src: object) -> None:
        """``dst[:] = src`` while the lease is live."""
        with self.writing():
            dst[:] = src  # type: ignore[call-overload]

    def on_revoke(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` (stop the transfer: cancel a request, drop a stream) when revoked; at once if already."""
        with self._lock:
            if not self._revoked:
                self._on_revoke.append(callback)
                return
        callback()

    def revoke(self, reason: str = "") -> None:
        """Stop every later write; returns only after a write in progress has finished."""
        with self._lock:
            if self._revoked:
                return
            self._revoked = True
            self._reason = reason
            callbacks, self._on_revoke = self._on_revoke, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # stopping the transfer is best effort: the lease already holds
                pass


class Call:
    """One operation as the store started it: a monotonic deadline and the buffer lease, if any."""

    __slots__ = ("deadline", "lease", "present", "timeout_s")

    def __init__(self, timeout_s: float, lease: BufferLease | None = None) -> None:
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.lease = lease
        # Names an earlier attempt of this call saw before it sent a delete (see ``existed``);
        # None until a delete needs it, so that reads and writes allocate nothing for it.
        self.present: set[str] | None = None

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


_current: contextvars.ContextVar[Call | None] = contextvars.ContextVar("kvstore_call", default=None)


def current() -> Call | None:
    """The call the running operation belongs to (None outside a store call: direct backend use)."""
    return _current.get()


@contextlib.contextmanager
def running(call: Call) -> Iterator[Call]:
    """Make ``call`` current in this thread for the duration of an operation."""
    token = _current.set(call)
    try:
        yield call
    finally:
        _current.reset(token)


def remaining(default: float) -> float:
    """Seconds left of the current call's deadline (``default`` outside a call), never below 0."""
    call = _current.get()
    return default if call is None else max(0.0, call.remaining())


def copy_into(dst: memoryview, src: object) -> None:
    """Copy ``src`` into ``dst`` through the current call's lease (a plain copy outside a call)."""
    call = _current.get()
    if call is None or call.lease is None:
        dst[:] = src  # type: ignore[call-overload]
    else:
        call.lease.copy_into(dst, src)


def land_piece(lease: BufferLease | None, buffer: memoryview, start: int, piece: object,
               on_chunk: Callable[[int, memoryview], None] | None) -> int:
    """Copy one arrived piece into ``buffer`` at ``start`` (through ``lease`` when there is one),
    hand it to ``on_chunk``, and return where the next piece goes."""
    end = start + len(piece)  # type: ignore[arg-type]
    if lease is None:
        buffer[start:end] = piece  # type: ignore[call-overload]
    else:
        lease.copy_into(buffer[start:end], piece)
    if on_chunk:
        on_chunk(start, buffer[start:end])
    return end


def lease() -> BufferLease | None:
    """The current call's buffer lease, for a backend that writes from threads of its own."""
    call = _current.get()
    return None if call is None else call.lease


def existed(names: list[str], present: list[bool]) -> list[bool]:
    """Whether each name existed when this call began, given what this attempt's HEADs found.

    A delete answered by an error may still have removed the objects (s3rver deletes them and
    then answers 500): the retried attempt finds them gone, and without this memory would tell
    the caller they never existed. Call it after the HEADs and before the delete request.
    """
    call = _current.get()
    if call is None:
        return present
    seen = call.present if call.present is not None else set()
    call.present = seen
    seen.update(n for n, there in zip(names, present) if there)
    return [there or n in seen for n, there in zip(names, present)]
