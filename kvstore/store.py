"""``KVStore``: the one public face over a (layered) backend.

It maps keys to object names (``<prefix>/<key>``, nothing else), validates keys and metadata,
and bounds requests in flight once for every caller, threads and event loops together. Blocking
calls go to the backend's blocking methods (batches fan out on a thread pool); asyncio calls
await the backend's coroutines on the caller's loop, so an asynchronous backend (the S3 clients)
serves any number of them with no thread per request. It never creates an event loop of its own.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar, overload

from kvstore.backends import call
from kvstore.backends.base import Backend, ObjectInfo, aclose_pages, as_byte_view, as_writable_view, listed
from kvstore.config import StoreConfig
from kvstore.errors import InvalidKey, KVStoreError
from kvstore.limiter import Inflight

T = TypeVar("T")
MAX_NAME_BYTES = 1024  # S3's limit on an object name
MAX_METADATA_BYTES = 2048  # S3's limit on user metadata
# Lowercase letters, digits and '-': S3 lowercases x-amz-meta-* names, Ceph RGW turns '_' into '-',
# and many HTTP proxies drop headers with '_'.
_META_KEY_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")
# Metadata names the library writes itself (the CRC32C, ...): a caller's own would be taken for ours.
RESERVED_META_PREFIX = "kvstore-"


class KVStore:
    """A KV-chunk store: ``put`` / ``get`` / ``get_into`` and friends, sync, batched and async.

    Build one with ``kvstore.open(url, extra_config)``. Thread-safe; close it (or use ``with``)
    to release the client and its threads.
    """

    def __init__(self, config: StoreConfig, backend: Backend) -> None:
        self.config = config
        self._backend = backend
        self._prefix = config.prefix.strip("/") + "/" if config.prefix.strip("/") else ""
        self._pool = ThreadPoolExecutor(max_workers=config.max_inflight, thread_name_prefix="kvstore")
        self._limiter = Inflight(config.max_inflight)
        # Leases of the reads in flight: close() revokes them, so nothing lands after it returns.
        self._leases: set[call.BufferLease] = set()
        self._closed = False
        self._close_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KVStore({self.config.url!r}, profile={self.config.profile!r}, backend={self.config.backend!r})"

    @property
    def backend(self) -> Backend:
        return self._backend

    # -- names -------------------------------------------------------------------------------
    def name_of(self, key: str) -> str:
        """The object name a key is stored under."""
        if not isinstance(key, str) or not key:
            raise InvalidKey(f"keys are non-empty strings, got {key!r}")
        if any(ord(c) < 32 or ord(c) == 127 for c in key):
            raise InvalidKey(f"control characters in key {key!r}")
        if any(segment in ("", ".", "..") for segment in key.split("/")):
            # S3 would take them, but path-based clients rewrite them, servers that keep objects as
            # files (SeaweedFS) turn "dir/" into a directory, and "../" reads as an escape.
            raise InvalidKey(f"key {key!r} has an empty, '.' or '..' segment (or a leading or trailing '/')")
        name = self._prefix + key
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidKey(f"key {key!r} is not valid Unicode text") from None
        if size > MAX_NAME_BYTES:
            raise InvalidKey(f"key too long: {size} bytes with the prefix, at most {MAX_NAME_BYTES}")
        return name

    def _key_of(self, name: str) -> str:
        return name[len(self._prefix):]

    @staticmethod
    def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
        if not metadata:
            return {}
        out = {}
        for k, v in metadata.items():
            if not isinstance(k, str) or not k or not set(k) <= _META_KEY_CHARS:
                raise InvalidKey(f"metadata keys are lowercase letters, digits and '-': {k!r}")
            if k.startswith(RESERVED_META_PREFIX):
                raise InvalidKey(f"metadata key {k!r}: names starting with {RESERVED_META_PREFIX!r} are kvstore's own")
            if not isinstance(v, str) or not v.isascii() or any(ord(c) < 32 for c in v):
                raise InvalidKey(f"metadata values are printable ASCII strings: {k}={v!r}")
            out[k] = v
        if sum(len(k) + len(v) for k, v in out.items()) > MAX_METADATA_BYTES:
            raise InvalidKey(f"metadata larger than {MAX_METADATA_BYTES} bytes")
        return out

    # -- core ----------------------------------------------------------------------------
    def _run(self, fn: Callable[..., T], *args: Any, lease: call.BufferLease | None = None) -> T:
        """Run one blocking backend operation under the in-flight bound, with its deadline and buffer lease current."""
        if self._closed:
            raise KVStoreError("the store is closed")
        self._limiter.acquire()
        try:
            self._hold(lease)
            with call.running(call.Call(self.config.timeout_s, lease)):
                return fn(*args)
        finally:
            if lease is not None:
                self._leases.discard(lease)
            self._limiter.release()

    async def _arun(self, work: Callable[[], Awaitable[T]], lease: call.BufferLease | None = None) -> T:
        """``_run`` for a backend coroutine, awaited on the caller's loop."""
        if self._closed:
            raise KVStoreError("the store is closed")
        await self._limiter.aacquire()
        try:
            self._hold(lease)
            with call.running(call.Call(self.config.timeout_s, lease)):
                return await work()
        finally:
            if lease is not None:
                self._leases.discard(lease)
            self._limiter.release()

    def _hold(self, lease: call.BufferLease | None) -> None:
        """Track a read's buffer lease, so that ``close`` can revoke it."""
        if lease is not None:
            with self._close_lock:
                if self._closed:
                    raise KVStoreError("the store is closed")
                self._leases.add(lease)

    def put(self, key: str, data: Any, metadata: Mapping[str, str] | None = None, *, if_absent: bool = False) -> None:
        """Store ``data`` (any contiguous buffer) under ``key``; ``if_absent`` refuses to overwrite."""
        name, view, meta = self.name_of(key), as_byte_view(data), self._check_metadata(metadata)
        self._run(lambda: self._backend.put(name, view, meta, if_absent=if_absent))

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None on a miss."""
        name = self.name_of(key)
        result = self._run(self._backend.get, name)
        if result is None:
            return None
        data = result[0]
        return data if isinstance(data, bytes) else bytes(data)

    @overload
    def get_into(self, key: str, buffer: Any, *, info: Literal[False] = False) -> int | None: ...

    @overload
    def get_into(self, key: str, buffer: Any, *, info: Literal[True]) -> ObjectInfo | None: ...

    def get_into(self, key: str, buffer: Any, *, info: bool = False) -> int | ObjectInfo | None:
        """Fill ``buffer`` (bytearray, memoryview, numpy array, CPU tensor) with the object; its size, or None.

        With ``info=True`` it hands back the object's size and metadata instead, from the same
        response: a reader that needs them sends no HEAD first.
        """
        name, view = self.name_of(key), as_writable_view(buffer)
        result = self._run(self._backend.get_into, name, view, lease=call.BufferLease())
        if result is None:
            return None
        return ObjectInfo(key, result.size, result.metadata) if info else result.size

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def stat(self, key: str) -> ObjectInfo | None:
        """Size and metadata of ``key``, or None."""
        name = self.name_of(key)
        info = self._run(self._backend.head, name)
        return None if info is None else ObjectInfo(key, info.size, info.metadata, info.last_modified, info.etag)

    def delete(self, key: str) -> bool:
        """Remove ``key``; False when it was not there."""
        name = self.name_of(key)
        return self._run(self._backend.delete, name)

    def list(self, prefix: str = "", *, start_after: str | None = None) -> Generator[str, None, None]:
        """Keys (relative to the store's prefix) that start with ``prefix``, in name order, a page at a time.

        ``start_after`` lists only the keys after it: a listing cut short resumes from its last key.
        """
        for info in self.scan(prefix, start_after=start_after):
            yield info.key

    def scan(self, prefix: str = "", *, start_after: str | None = None) -> Generator[ObjectInfo, None, None]:
        """Like ``list``, with each object's size, metadata and modification time."""
        pages = self._pages(prefix, start_after)
        try:
            while (page := self._run(next, pages, None)) is not None:
                yield from page
        finally:
            pages.close()

    def _pages(self, prefix: str, start_after: str | None) -> Generator[builtins.list[ObjectInfo], None, None]:
        """The backend's pages with keys relative to the prefix; each page is pulled as one store call."""
        if self._closed:
            raise KVStoreError("the store is closed")
        after = None if start_after is None else self._prefix + start_after
        for page in self._backend.list_pages(self._prefix + prefix, after):
            yield [listed(i, self._key_of(i.key)) for i in page]

    # -- batches -------------------------------------------------------------------------
    def _map(self, fn: Callable[[Any], T], items: builtins.list[Any]) -> builtins.list[T]:
        """Run ``fn`` over ``items`` on the pool, at most max_inflight at once, results in order."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        if self._closed:
            raise KVStoreError("the store is closed")
        return list(self._pool.map(fn, items))

    def put_many(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]], metadata: Mapping[str, str] | None = None) -> None:
        """Store several objects; ``items`` is a mapping or (key, data) pairs."""
        pairs = _distinct_pairs(items)
        self._map(lambda kv: self.put(kv[0], kv[1], metadata), pairs)

    def get_many(self, keys: Iterable[str]) -> builtins.list[bytes | None]:
        return self._map(self.get, list(keys))

    def get_into_many(self, keys: Iterable[str], buffers: Iterable[Any]) -> builtins.list[int | None]:
        keys, buffers = list(keys), list(buffers)
        if len(keys) != len(buffers):
            raise ValueError(f"{len(keys)} keys but {len(buffers)} buffers")
        return self._map(lambda kb: self.get_into(*kb), list(zip(keys, buffers)))

    def exists_many(self, keys: Iterable[str]) -> builtins.list[bool]:
        return self._map(self.exists, list(keys))

    def delete_many(self, keys: Iterable[str]) -> builtins.list[bool]:
        """Delete several keys; each answer says whether that key was there (a repeated key: only its first)."""
        names = [self.name_of(k) for k in keys]
        unique = list(dict.fromkeys(names))
        return _per_key(names, unique, self._run(self._backend.delete_many, unique) if names else [])

    def discard(self, key: str) -> None:
        """Remove ``key`` if it is there, without finding out whether it was (on S3: a DELETE, no HEAD)."""
        self.discard_many([key])

    def discard_many(self, keys: Iterable[str]) -> None:
        """``discard`` for several keys; S3 backends send batched DeleteObjects and nothing else."""
        names = list(dict.fromkeys(self.name_of(k) for k in keys))
        if names:
            self._run(self._backend.discard_many, names)

    # -- asyncio -------------------------------------------------------------------------
    async def aput(self, key: str, data: Any, metadata: Mapping[str, str] | None = None, *, if_absent: bool = False) -> None:
        name, view, meta = self.name_of(key), as_byte_view(data), self._check_metadata(metadata)
        await self._arun(lambda: self._backend.aput(name, view, meta, if_absent=if_absent))

    async def aget(self, key: str) -> bytes | None:
        name = self.name_of(key)
        result = await self._arun(lambda: self._backend.aget(name))
        if result is None:
            return None
        data = result[0]
        return data if isinstance(data, bytes) else bytes(data)

    @overload
    async def aget_into(self, key: str, buffer: Any, *, info: Literal[False] = False) -> int | None: ...

    @overload
    async def aget_into(self, key: str, buffer: Any, *, info: Literal[True]) -> ObjectInfo | None: ...

    async def aget_into(self, key: str, buffer: Any, *, info: bool = False) -> int | ObjectInfo | None:
        """``get_into`` on the caller's loop; ``info=True`` hands back size and metadata from the same response.

        A cancel (or ``wait_for``'s timeout) revokes the buffer before it propagates: whatever
        the transfer is still doing, it can no longer touch ``buffer``, which the caller
        (LMCache) may free or reuse the moment this returns.
        """
        name, view = self.name_of(key), as_writable_view(buffer)
        lease = call.BufferLease()
        try:
            result = await self._arun(lambda: self._backend.aget_into(name, view), lease)
        except asyncio.CancelledError:
            lease.revoke("the call was cancelled")
            raise
        if result is None:
            return None
        return ObjectInfo(key, result.size, result.metadata) if info else result.size

    async def aexists(self, key: str) -> bool:
        return await self.astat(key) is not None

    async def astat(self, key: str) -> ObjectInfo | None:
        name = self.name_of(key)
        info = await self._arun(lambda: self._backend.ahead(name))
        return None if info is None else ObjectInfo(key, info.size, info.metadata, info.last_modified, info.etag)

    async def adelete(self, key: str) -> bool:
        name = self.name_of(key)
        return await self._arun(lambda: self._backend.adelete(name))

    async def alist(self, prefix: str = "", *, start_after: str | None = None) -> AsyncIterator[str]:
        """``list`` as an async iterator: one page is fetched at a time."""
        async for info in self.ascan(prefix, start_after=start_after):
            yield info.key

    async def ascan(self, prefix: str = "", *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        """``scan`` as an async iterator; closing it early closes the listing."""
        if self._closed:
            raise KVStoreError("the store is closed")
        after = None if start_after is None else self._prefix + start_after
        pages = aiter(self._backend.alist_pages(self._prefix + prefix, after))
        try:
            while (page := await self._arun(lambda: anext(pages, None))) is not None:
                for i in page:
                    yield listed(i, self._key_of(i.key))
        finally:
            await aclose_pages(pages)

    async def aput_many(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]], metadata: Mapping[str, str] | None = None) -> None:
        pairs = _distinct_pairs(items)
        await asyncio.gather(*(self.aput(k, d, metadata) for k, d in pairs))

    async def aget_many(self, keys: Iterable[str]) -> builtins.list[bytes | None]:
        return list(await asyncio.gather(*(self.aget(k) for k in keys)))

    async def aget_into_many(self, keys: Iterable[str], buffers: Iterable[Any]) -> builtins.list[int | None]:
        keys, buffers = list(keys), list(buffers)
        if len(keys) != len(buffers):
            raise ValueError(f"{len(keys)} keys but {len(buffers)} buffers")
        return list(await asyncio.gather(*(self.aget_into(k, b) for k, b in zip(keys, buffers))))

    async def aexists_many(self, keys: Iterable[str]) -> builtins.list[bool]:
        return list(await asyncio.gather(*(self.aexists(k) for k in keys)))

    async def adelete_many(self, keys: Iterable[str]) -> builtins.list[bool]:
        names = [self.name_of(k) for k in keys]
        unique = list(dict.fromkeys(names))
        return _per_key(names, unique, await self._arun(lambda: self._backend.adelete_many(unique)) if names else [])

    async def adiscard(self, key: str) -> None:
        await self.adiscard_many([key])

    async def adiscard_many(self, keys: Iterable[str]) -> None:
        names = list(dict.fromkeys(self.name_of(k) for k in keys))
        if names:
            await self._arun(lambda: self._backend.adiscard_many(names))

    # -- lifecycle -----------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """Counters and latency histograms per operation (empty when metrics are off)."""
        from kvstore.layers.metrics import find_metrics

        layer = find_metrics(self._backend)
        return layer.snapshot() if layer is not None else {}

    def close(self) -> None:
        """Release the backend and the pool. Idempotent; does not wait for calls in flight.

        Calls in flight and queued ones fail with ``KVStoreError``; once ``close`` returns, no
        read writes a caller's buffer any more.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            leases = list(self._leases)
        self._limiter.close()
        for lease in leases:
            lease.revoke("the store was closed")
        self._pool.shutdown(wait=False)
        self._backend.close()

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> KVStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _distinct_pairs(items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The (key, data) pairs of a batched put; a key given twice is an error, since either write could land last."""
    pairs = list(items.items() if isinstance(items, Mapping) else items)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} is given twice in one batch: which of its values would be stored is undefined")
        seen.add(key)
    return pairs


def _per_key(names: list[str], unique: list[str], found: list[bool]) -> list[bool]:
    """Answers for ``names`` from the answers for ``unique``: a repeat finds its key already deleted."""
    first = dict(zip(unique, found))
    return [first.pop(name, False) for name in names]
