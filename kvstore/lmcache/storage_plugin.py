"""Non-MP storage plugin (``StoragePluginInterface``) over a kvstore store.

LMCache config::

    storage_plugins: ["kvstore"]
    extra_config:
      storage_plugin.kvstore.module_path: kvstore.lmcache
      storage_plugin.kvstore.class_name: KVStoreStoragePlugin
      kvstore_url: "s3://my-bucket/kv"

The reads, writes and names are ``KVStoreConnector``'s, so a chunk's layout travels with it:
a fresh process finds and loads what an earlier one wrote, and keys of any length work.
Pinning is local: a pinned key is not removed unless ``remove(force=True)``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.storage_backend.abstract_backend import StoragePluginInterface

from kvstore.lmcache.connector import KVStoreConnector

log = logging.getLogger(__name__)
# A cancelled read ends at its next write to the buffer or its next piece; this bounds the wait.
CANCEL_SETTLE_S = 5.0
_TIMED_OUT = object()
T = TypeVar("T")


class KVStoreStoragePlugin(StoragePluginInterface):
    """LMCache storage backend that keeps every chunk in a kvstore store."""

    def __init__(self, config: Any = None, dst_device: str = "cpu", metadata: Any = None, local_cpu_backend: Any = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(dst_device=dst_device, config=config, metadata=metadata, local_cpu_backend=local_cpu_backend, loop=loop)
        if config is None or metadata is None or local_cpu_backend is None or loop is None:
            raise ValueError("KVStoreStoragePlugin needs config, metadata, local_cpu_backend and loop (max_local_cpu_size > 0)")
        self.connector = KVStoreConnector(config, metadata, local_cpu_backend)
        self._lock = threading.Lock()
        self._put_tasks: set[CacheEngineKey] = set()
        self._pins: Counter[CacheEngineKey] = Counter()
        self.timeout_s = float(getattr(config, "blocking_timeout_secs", 10) or 10)

    def __str__(self) -> str:
        return self.__class__.__name__

    def _run(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    # -- presence and pins -----------------------------------------------------------------
    def contains(self, key: CacheEngineKey, pin: bool = False) -> bool:
        found = self.connector.exists_sync(key)
        if found and pin:
            self.pin(key)
        return found

    def batched_contains(self, keys: list[CacheEngineKey], pin: bool = False) -> int:
        hits = self.connector.batched_contains(keys)
        if pin:
            for key in keys[:hits]:
                self.pin(key)
        return hits

    async def batched_async_contains(self, lookup_id: str, keys: list[CacheEngineKey], pin: bool = False) -> int:
        hits = await self.connector.batched_async_contains(lookup_id, keys)
        if pin:
            for key in keys[:hits]:
                self.pin(key)
        return hits

    def pin(self, key: CacheEngineKey) -> bool:
        """Keep ``key`` from non-forced removal; False when the store does not hold it."""
        with self._lock:
            if self._pins.get(key):
                self._pins[key] += 1
                return True
        if not self.connector.exists_sync(key):
            return False
        with self._lock:
            self._pins[key] += 1
        return True

    def unpin(self, key: CacheEngineKey) -> bool:
        """Drop one pin; False when ``key`` was not pinned."""
        with self._lock:
            if not self._pins.get(key):
                return False
            self._pins[key] -= 1
            if not self._pins[key]:
                del self._pins[key]
            return True

    def is_pinned(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return self._pins.get(key, 0) > 0

    def remove(self, key: CacheEngineKey, force: bool = True) -> bool:
        """Delete ``key``; a pinned key only when ``force``. False when nothing was removed."""
        with self._lock:
            if self._pins.get(key, 0) and not force:
                return False
            self._pins.pop(key, None)
        return self.connector.remove_sync(key)

    # -- writes ----------------------------------------------------------------------------
    def exists_in_put_tasks(self, key: CacheEngineKey) -> bool:
        with self._lock:
            return key in self._put_tasks

    def batched_submit_put_task(
        self,
        keys: Sequence[CacheEngineKey],
        objs: list[MemoryObj],
        transfer_spec: Any = None,
        on_complete_callback: Callable[[CacheEngineKey], None] | None = None,
    ) -> list[Future[None]]:
        """Start one write per chunk; each holds its own reference until the write ends."""
        self.connector.remember_chain(keys)  # before any is skipped: consecutive keys are predecessors
        futures = []
        for key, obj in zip(keys, objs):
            with self._lock:
                if key in self._put_tasks:
                    continue
                self._put_tasks.add(key)
            obj.ref_count_up()
            future = self._run(self.connector.put(key, obj))
            future.add_done_callback(functools.partial(self._put_done, key=key, obj=obj, callback=on_complete_callback))
            futures.append(future)
        return futures

    def _put_done(self, future: Future[None], key: CacheEngineKey, obj: MemoryObj,
                  callback: Callable[[CacheEngineKey], None] | None) -> None:
        obj.ref_count_down()
        with self._lock:
            self._put_tasks.discard(key)
        if future.cancelled() or future.exception() is not None:
            log.error("kvstore: storing %s failed: %s", key.to_string(), "cancelled" if future.cancelled() else future.exception())
            return
        if callback is not None:
            try:
                callback(key)
            except Exception as exc:  # LMCache's contract: callback errors are logged, not raised
                log.warning("kvstore: on_complete_callback for %s failed: %s", key.to_string(), exc)

    # -- reads -----------------------------------------------------------------------------
    def get_blocking(self, key: CacheEngineKey) -> MemoryObj | None:
        found = self._blocking(self.connector.get(key), key.to_string())
        return found if found is not _TIMED_OUT else None

    def get_non_blocking(self, key: CacheEngineKey, location: str | None = None) -> Future[MemoryObj | None]:
        return self._run(self.connector.get(key))

    def batched_get_blocking(self, keys: list[CacheEngineKey]) -> list[MemoryObj | None]:
        found = self._blocking(self.connector.batched_get(keys), f"{len(keys)} chunks")
        return found if found is not _TIMED_OUT else [None] * len(keys)

    def _blocking(self, coro: Awaitable[Any], what: str) -> Any:
        """``coro``'s result within ``blocking_timeout_secs``, or ``_TIMED_OUT`` once it has really stopped.

        Cancelling a ``run_coroutine_threadsafe`` future only asks the loop to cancel the task;
        waiting for the task to end means its reads have revoked their buffers (and handed their
        memory objects back) before we tell LMCache there is nothing.
        """
        ended = threading.Event()

        async def watched() -> Any:
            try:
                return await coro
            finally:
                ended.set()

        future = self._run(watched())
        try:
            return future.result(self.timeout_s)
        except (TimeoutError, concurrent.futures.TimeoutError):  # distinct classes before 3.11
            if not future.cancel():  # it finished in the meantime: its answer stands
                return future.result()
            if not ended.wait(CANCEL_SETTLE_S):
                log.error("kvstore: get %s did not stop within %.1fs of its cancel", what, CANCEL_SETTLE_S)
            log.warning("kvstore: get %s timed out after %.1fs", what, self.timeout_s)
            return _TIMED_OUT

    async def batched_get_non_blocking(self, lookup_id: str, keys: list[CacheEngineKey], transfer_spec: Any = None) -> list[MemoryObj]:
        found: list[MemoryObj] = await self.connector.batched_get_non_blocking(lookup_id, keys)
        return found

    def get_allocator_backend(self) -> Any:
        return self.local_cpu_backend

    def close(self) -> None:
        self.connector.shutdown()
