"""The narrow protocol every backend implements: object names in, buffers and metadata out.

A backend moves bytes and nothing else: no retries, deadlines, metrics, checksums or key
mapping (those are layers, see ``kvstore.layers``). Every operation has a blocking method and a
coroutine twin (``put`` / ``aput``, ...), all thread-safe. A backend implements one side: a
blocking one (the file store) implements the blocking methods and gets coroutines that run them
on a bounded pool of its own; an asynchronous one (``coroutines.AsyncBackend``: the S3 clients)
implements the coroutines, which asyncio callers await directly, and gets blocking methods that
run them on a loop thread. Listings come a page at a time, in name order, and resume after any
name, so that a layer can retry one page and nothing ever holds a whole listing.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import contextlib
import contextvars
import functools
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from kvstore.config import StoreConfig
from kvstore.errors import BufferTooSmall, ConfigError, IntegrityError, KVStoreError

if TYPE_CHECKING:
    from typing_extensions import Buffer

OnChunk = Callable[[int, memoryview], None]
"""``on_chunk(offset, view)``: a piece of an object that has just landed in the caller's buffer."""

# Bytes a backend lands (and hands to on_chunk) at a time: small enough to stay in cache. Streaming
# backends join smaller network chunks up to it.
PIECE = 1 << 20


# How often ``get`` sizes a buffer again for an object replaced under it.
GET_RESIZES = 4
# ``sized_read``: the object changed size between the HEAD and the read; size it again.
AGAIN: Any = object()
T = TypeVar("T")

# Objects per listing page: what S3's ListObjectsV2 returns at most, and what local stores hand out at a time.
LIST_PAGE = 1000


class _NotListed(Mapping[str, str]):
    """The metadata of an object seen only in a listing: reading it is an error, not an empty mapping."""

    __slots__ = ()

    def _refuse(self) -> KVStoreError:
        return KVStoreError("a listing carries no object metadata: stat(key) reads it")

    def __getitem__(self, key: str) -> str:
        raise self._refuse()

    def __iter__(self) -> Iterator[str]:
        raise self._refuse()

    def __len__(self) -> int:
        raise self._refuse()

    def __eq__(self, other: object) -> bool:
        return other is self

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return "NOT_LISTED"

    def __reduce__(self) -> str:
        return "NOT_LISTED"  # pickled by name: one value in every process (Ray workers)


NOT_LISTED: Mapping[str, str] = _NotListed()


def listed(info: ObjectInfo, key: str) -> ObjectInfo:
    """``info`` from a listing, under ``key``; empty metadata there means not listed."""
    metadata = info.metadata if info.metadata is NOT_LISTED or len(info.metadata) else NOT_LISTED
    return ObjectInfo(key, info.size, metadata, info.last_modified, info.etag)


@dataclass(frozen=True)
class ObjectInfo:
    """What ``stat`` knows of one object. ``key`` is relative to the store's prefix.

    In a listing (``scan``) ``metadata`` is ``NOT_LISTED`` unless the backend listed it: S3's
    ListObjectsV2 carries none, and an empty mapping would say the object has none.
    """

    key: str
    size: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    last_modified: float | None = None  # seconds since the epoch
    etag: str | None = None


@dataclass(frozen=True)
class ReadResult:
    """What a read returns besides the bytes: the object's size and metadata."""

    size: int
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the conformance suite skips cases that do not apply."""

    metadata: bool = True
    conditional_put: bool = False
    listing: bool = True
    last_modified: bool = True


class Backend(abc.ABC):
    """One object store reached one way. Names are full object names (prefix included)."""

    # Per class; a layer copies its inner backend's onto the instance.
    capabilities: Capabilities = Capabilities()

    def __init__(self, config: StoreConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def put(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        """Store ``data`` (a flat byte view) under ``name``, atomically: readers see old or new, never a mix."""

    @abc.abstractmethod
    def get_into(self, name: str, buffer: memoryview, on_chunk: OnChunk | None = None) -> ReadResult | None:
        """Read the whole object into the start of ``buffer``; None on a miss.

        Raises ``BufferTooSmall`` before writing past the end when the object is larger, and
        ``IntegrityError`` when fewer bytes arrive than the object's advertised size.
        ``on_chunk``, when given, sees each piece just after it lands, while it is still in cache
        (the integrity layer checksums there rather than reading the whole buffer again). A
        backend may skip it; the caller then cannot assume any piece was seen.
        """

    def get(self, name: str) -> tuple[bytes | bytearray | memoryview, ReadResult] | None:
        """The whole object as bytes. The default sizes a buffer with ``head`` first.

        An object replaced between the HEAD and the GET (larger or smaller) is sized and read
        again, a few times; one that keeps changing raises the last ``BufferTooSmall``.
        """
        for attempt in range(GET_RESIZES):
            info = self.head(name)
            if info is None:
                return None
            buffer = bytearray(info.size)
            try:
                result = self.get_into(name, memoryview(buffer))
            except BufferTooSmall:
                if attempt == GET_RESIZES - 1:
                    raise
                continue
            outcome = sized_read(attempt, info.size, buffer, result)
            if outcome is not AGAIN:
                return outcome
        raise AssertionError("unreachable")  # pragma: no cover

    @abc.abstractmethod
    def head(self, name: str) -> ObjectInfo | None:
        """Size and metadata of ``name`` (``key`` set to the full name); None when absent."""

    @abc.abstractmethod
    def delete(self, name: str) -> bool:
        """Remove ``name``; False when it was not there."""

    def delete_many(self, names: list[str]) -> list[bool]:
        """Remove several objects; native batch calls where the service has them."""
        return [self.delete(name) for name in names]

    def discard_many(self, names: list[str]) -> None:
        """Remove several objects without learning whether they were there (S3: no HEADs first)."""
        self.delete_many(names)

    @abc.abstractmethod
    def list_pages(self, prefix: str, start_after: str | None = None) -> Iterator[Sequence[ObjectInfo]]:
        """Pages of the objects whose name starts with ``prefix`` and sorts after ``start_after``.

        Names come in ascending order (code points, which is UTF-8 byte order, as S3 lists), each
        ``key`` set to the full name. Each page is one request where the service pages (S3's
        ListObjectsV2), at most about ``LIST_PAGE`` objects elsewhere; a page may be empty. A
        failed page is raised; listing again with ``start_after`` the last name seen resumes.
        """

    def list(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """The objects of ``list_pages``, one by one."""
        for page in self.list_pages(prefix, start_after):
            yield from page

    # -- coroutines: a blocking backend's methods on a bounded pool of its own -----------------
    # Whether the blocking methods wait on I/O. A backend that never waits (memory) sets it
    # False and its coroutines run the blocking methods inline, on the caller's loop.
    blocking: bool = True

    async def aput(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        """``put`` as a coroutine."""
        await self._off_loop(functools.partial(self.put, name, data, metadata, if_absent=if_absent))

    async def aget_into(self, name: str, buffer: memoryview, on_chunk: OnChunk | None = None) -> ReadResult | None:
        """``get_into`` as a coroutine."""
        return await self._off_loop(functools.partial(self.get_into, name, buffer, on_chunk))

    async def aget(self, name: str) -> tuple[bytes | bytearray | memoryview, ReadResult] | None:
        """``get`` as a coroutine."""
        return await self._off_loop(functools.partial(self.get, name))

    async def ahead(self, name: str) -> ObjectInfo | None:
        """``head`` as a coroutine."""
        return await self._off_loop(functools.partial(self.head, name))

    async def adelete(self, name: str) -> bool:
        """``delete`` as a coroutine."""
        return await self._off_loop(functools.partial(self.delete, name))

    async def adelete_many(self, names: builtins.list[str]) -> builtins.list[bool]:
        """``delete_many`` as a coroutine."""
        return await self._off_loop(functools.partial(self.delete_many, names))

    async def adiscard_many(self, names: builtins.list[str]) -> None:
        """``discard_many`` as a coroutine."""
        await self._off_loop(functools.partial(self.discard_many, names))

    async def alist_pages(self, prefix: str, start_after: str | None = None) -> AsyncIterator[Sequence[ObjectInfo]]:
        """``list_pages`` as an async iterator: each page is pulled off the loop."""
        pages = iter(self.list_pages(prefix, start_after))
        # A pull cancelled on the loop still runs in its thread: closing waits for it there.
        lock = threading.Lock()

        def pull() -> Sequence[ObjectInfo] | None:
            with lock:
                return next(pages, None)

        def shut() -> None:
            with lock:
                close_pages(pages)

        try:
            while (page := await self._off_loop(pull)) is not None:
                yield page
        finally:
            if lock.acquire(blocking=False):
                lock.release()
                shut()
            else:
                with contextlib.suppress(RuntimeError):  # a closed pool: its threads end the listing
                    self._pool().submit(shut)

    async def _off_loop(self, work: Callable[[], T]) -> T:
        """Run blocking ``work`` on the backend's pool (inline when it never blocks), in this call's context."""
        if not self.blocking:
            return work()
        pool = self._pool()
        try:
            future = asyncio.get_running_loop().run_in_executor(pool, contextvars.copy_context().run, work)
        except RuntimeError as exc:  # the pool shut down between the lookup and the submit
            raise KVStoreError("the store is closed") from exc
        return await future

    def _pool(self) -> ThreadPoolExecutor:
        pool: ThreadPoolExecutor | None = self.__dict__.get("_threads")
        if pool is None:
            with _POOL_LOCK:
                pool = self.__dict__.get("_threads")
                if pool is None:
                    pool = ThreadPoolExecutor(max_workers=max(1, self.config.max_inflight),
                                              thread_name_prefix=f"kvstore-{type(self).__name__}")
                    self.__dict__["_threads"] = pool
        return pool

    def close(self) -> None:
        """Release clients, threads and sockets. Idempotent. A subclass that overrides it calls it too."""
        pool = self.__dict__.pop("_threads", None)
        if pool is not None:
            # Queued work is not cancelled: it runs, finds the store closed and fails with a
            # KVStoreError, which is what an awaiting caller should see rather than CancelledError.
            pool.shutdown(wait=False)


_POOL_LOCK = threading.Lock()


def sized_read(attempt: int, size: int, buffer: bytearray,
               result: ReadResult | None) -> tuple[bytes | bytearray | memoryview, ReadResult] | None:
    """What ``get`` makes of one read into a ``size``-byte buffer: the object, a miss, or ``AGAIN``."""
    if result is None:
        return None
    if result.size == size:
        return buffer, result
    if attempt == GET_RESIZES - 1:  # shrank again and again: the last read is whole
        return memoryview(buffer)[: result.size], result
    return cast("tuple[bytes, ReadResult]", AGAIN)


def ca_bundle_pem(config: StoreConfig) -> bytes | None:
    """The PEM text of ``s3_ca_bundle`` (None when unset); a file that cannot be read is a ConfigError."""
    if not config.ca_bundle:
        return None
    try:
        with open(config.ca_bundle, "rb") as f:
            pem = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the CA bundle {config.ca_bundle!r}: {exc.strerror}", key="s3_ca_bundle") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:  # else clients would quietly fall back to the system CAs
        raise ConfigError(f"the CA bundle {config.ca_bundle!r} holds no PEM certificate", key="s3_ca_bundle")
    return pem


def as_byte_view(data: object) -> memoryview:
    """A flat, read-only byte view of any buffer (bytes, bytearray, numpy, torch CPU tensor) without copying."""
    if hasattr(data, "numpy") and hasattr(data, "is_contiguous") and hasattr(data, "device"):
        data = _torch_bytes(data)
    view = memoryview(cast("Buffer", data))
    if not view.c_contiguous:  # a Fortran-ordered array is contiguous too, but not in the byte order we store
        raise ValueError("data must be a C-contiguous buffer (numpy: np.ascontiguousarray)")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def as_writable_view(buffer: object) -> memoryview:
    """A flat, writable byte view of a caller's buffer, without copying."""
    if hasattr(buffer, "numpy") and hasattr(buffer, "is_contiguous") and hasattr(buffer, "device"):
        buffer = _torch_bytes(buffer)
    view = memoryview(cast("Buffer", buffer))
    if view.readonly:
        raise ValueError("get_into needs a writable buffer (bytearray, memoryview, numpy array, CPU tensor)")
    if not view.c_contiguous:
        raise ValueError("get_into needs a C-contiguous buffer (numpy: np.ascontiguousarray)")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _torch_bytes(tensor: Any) -> Any:
    """A uint8 numpy view sharing the tensor's memory (works for bf16, which numpy lacks)."""
    if tensor.device.type != "cpu":
        raise ValueError(f"only CPU tensors can be read or written directly, got device {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError("tensor must be contiguous")
    flat = tensor.detach().reshape(-1)
    return flat.view(__import__("torch").uint8).numpy() if flat.numel() else bytearray()




def read_exactly(readinto: Callable[[memoryview], int | None], name: str, size: int, buffer: memoryview, on_chunk: OnChunk | None = None, *, local: bool = False) -> None:
    """Fill ``buffer[:size]`` from a ``readinto``-style callable; a short source is an IntegrityError.

    With ``on_chunk`` it reads ``PIECE`` bytes at a time and hands each piece on as it lands.
    Writes go through the current call's buffer lease (``kvstore.backends.call``): a ``local``
    source (a file on this machine) is read straight into the buffer while the lease is held; a
    network source is read into a piece of our own first and copied while the lease is live, so
    that a cancelled call never waits on the network and nothing lands after it returned.
    """
    from kvstore.backends import call as _call

    if size > len(buffer):
        raise BufferTooSmall(name, size, len(buffer))
    lease = _call.lease()
    bounce = None if lease is None or local else bytearray(min(size, PIECE))
    done = 0
    while done < size:
        end = min(size, done + PIECE) if (on_chunk or lease is not None) else size
        if lease is None:
            n = readinto(buffer[done:end])
        elif bounce is None:
            with lease.writing():
                n = readinto(buffer[done:end])
        else:
            piece = memoryview(bounce)[: end - done]
            n = readinto(piece)
            if n:
                lease.copy_into(buffer[done:done + n], piece[:n])
        if not n:
            raise IntegrityError(f"{name!r}: {done} of {size} bytes arrived")
        if on_chunk:
            on_chunk(done, buffer[done:done + n])
        done += n


def pages_of(infos: Iterable[ObjectInfo], prefix: str, start_after: str | None, size: int = LIST_PAGE) -> Iterator[list[ObjectInfo]]:
    """Pages of ``size`` from ``infos`` (already in name order), keeping names under ``prefix`` after ``start_after``."""
    page: list[ObjectInfo] = []
    for info in infos:
        if not info.key.startswith(prefix) or (start_after is not None and info.key <= start_after):
            continue
        page.append(info)
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page


def close_pages(pages: object) -> None:
    """Close a listing left part-way (a generator holding a directory or a connection), now rather than at GC."""
    close = getattr(pages, "close", None)
    if close is not None:
        close()


async def aclose_pages(pages: object) -> None:
    """``close_pages`` for an async listing."""
    close = getattr(pages, "aclose", None)
    if close is not None:
        await close()
