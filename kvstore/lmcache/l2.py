"""MP-mode L2 adapter over a kvstore store.

Loaded by LMCache as::

    {"type": "plugin", "module_path": "kvstore.lmcache.l2",
     "class_name": "KVStoreL2Adapter", "config_class_name": "KVStoreL2AdapterConfig",
     "adapter_params": {"kvstore_url": "s3://my-bucket/kv", "s3_region": "us-east-1",
                        "max_capacity_gb": 100}}

``adapter_params`` takes the store keys of LMCache's built-in ``"s3"`` L2 spec (``s3_endpoint``,
``s3_region``, ..., ``max_capacity_gb``) and every kvstore key. The keys LMCache's framework reads
(``eviction``, ``serde``, ``persist_enabled``, ``affinity_tag``, ``shared``) go at the top level
of the spec, next to ``adapter_params``: LMCache never looks for them inside it, so one found
there is refused with a message saying where it belongs. Objects are named as the built-in S3 L2 adapter names
them, so either can read the other's bucket (with ``kvstore_key_layout`` flat). The adapter runs its own
asyncio loop on a thread; all public methods are thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, OrderedDict
from typing import Any, cast

from lmcache.lmcache_native import Bitmap
from lmcache.v1.distributed.api import KeyEntry, KeyListPage, ObjectKey
from lmcache.v1.distributed.internal_api import L2StoreResult
from lmcache.v1.distributed.l2_adapters.base import L2AdapterInterface, L2TaskId
from lmcache.v1.distributed.l2_adapters.config import L2AdapterConfigBase
from lmcache.v1.distributed.l2_adapters.s3_l2_adapter import _string_to_object_key
from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.platform import create_event_notifier

import kvstore
from kvstore import naming
from kvstore.backends.base import LIST_PAGE
from kvstore.config import StoreConfig
from kvstore.errors import KVStoreError
from kvstore.lmcache import chunks, config_gen

log = logging.getLogger(__name__)
DELETE_TIMEOUT_S = 30.0
SEEN_KEYS = 1 << 20  # keys found by lookups remembered, so that a lookup of them sends no HEAD
_CURSOR = "kvstore:"  # list_l2_keys cursors: this prefix and the last object name listed


class KVStoreL2AdapterConfig(L2AdapterConfigBase):
    """The adapter's settings: ``adapter_params`` resolved into a ``StoreConfig``."""

    def __init__(self, store_config: StoreConfig) -> None:
        self.store_config = store_config

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVStoreL2AdapterConfig:
        """Resolve ``adapter_params``; ConfigError (a ValueError, as LMCache expects) for a misplaced or wrong key."""
        config_gen.check_adapter_params(d)
        return cls(kvstore.resolve(d.get("kvstore_url"), d))

    @classmethod
    def help(cls) -> str:
        return (
            "kvstore L2 adapter fields: kvstore_url (or s3_endpoint), s3_region, s3_num_io_threads, "
            "s3_prefer_http2, s3_enable_s3express, disable_tls, aws_access_key_id, aws_secret_access_key, "
            "max_capacity_gb, any kvstore_* key. eviction, serde, persist_enabled, affinity_tag and shared go at "
            "the top level of the spec, not in adapter_params"
        )


class KVStoreL2Adapter(L2AdapterInterface):
    """``L2AdapterInterface`` on a kvstore store: store, lookup-and-lock, load, unlock, delete."""

    def __init__(self, config: KVStoreL2AdapterConfig | dict[str, Any], l1_memory_desc: Any = None) -> None:
        if isinstance(config, dict):
            config = KVStoreL2AdapterConfig.from_dict(config)
        store_config = config.store_config
        super().__init__(max_capacity_bytes=store_config.lmcache.capacity_bytes)
        self.store = kvstore.open_config(store_config)
        self.layout = store_config.lmcache.key_layout
        self._store_efd = create_event_notifier()
        self._lookup_efd = create_event_notifier()
        self._load_efd = create_event_notifier()
        self._lock = threading.Lock()
        self._next_task_id: L2TaskId = 0
        self._stored: dict[L2TaskId, L2StoreResult] = {}
        self._lookups: dict[L2TaskId, Bitmap] = {}
        self._loads: dict[L2TaskId, Bitmap] = {}
        self._locks: Counter[ObjectKey] = Counter()
        self._seen: OrderedDict[ObjectKey, int] = OrderedDict()  # keys found by lookups, and their sizes
        self._sizes: dict[ObjectKey, int] = {}
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvstore-l2", daemon=True)
        self._thread.start()

    def _name(self, key: ObjectKey) -> str:
        return naming.mp_object_name(key, self.layout)

    # -- event fds -------------------------------------------------------------------------
    def get_store_event_fd(self) -> int:
        return cast(int, self._store_efd.fileno())

    def get_lookup_and_lock_event_fd(self) -> int:
        return cast(int, self._lookup_efd.fileno())

    def get_load_event_fd(self) -> int:
        return cast(int, self._load_efd.fileno())

    # -- store -----------------------------------------------------------------------------
    def submit_store_task(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> L2TaskId:
        task_id = self._new_task_id()
        asyncio.run_coroutine_threadsafe(self._store(list(keys), list(objects), task_id), self._loop)
        return task_id

    async def _store(self, keys: list[ObjectKey], objects: list[MemoryObj], task_id: L2TaskId) -> None:
        results = await asyncio.gather(
            *(self.store.aput(self._name(k), o.byte_array, chunks.layout_of(o).metadata()) for k, o in zip(keys, objects)),
            return_exceptions=True,
        )
        new_keys, new_sizes = [], []
        for key, obj, result in zip(keys, objects, results):
            if isinstance(result, BaseException):
                log.error("kvstore L2: storing %s failed: %s", self._name(key), result)
                continue
            with self._lock:
                is_new = key not in self._sizes
                self._sizes[key] = obj.get_size()
            if is_new:
                new_keys.append(key)
                new_sizes.append(obj.get_size())
        ok = not any(isinstance(r, BaseException) for r in results)
        with self._lock:
            self._stored[task_id] = L2StoreResult(ok, sum(new_sizes))
        if new_keys:
            self._notify_keys_stored(new_keys, new_sizes)
        self._store_efd.notify()

    def pop_completed_store_tasks(self) -> dict[L2TaskId, L2StoreResult]:
        with self._lock:
            done, self._stored = self._stored, {}
        return done

    # -- lookup and lock -------------------------------------------------------------------
    def submit_lookup_and_lock_task(self, keys: list[ObjectKey], group_layout_descs: dict[Any, Any] | None = None) -> L2TaskId:
        task_id = self._new_task_id()
        asyncio.run_coroutine_threadsafe(self._lookup(list(keys), task_id), self._loop)
        return task_id

    async def _lookup(self, keys: list[ObjectKey], task_id: L2TaskId) -> None:
        # Keys this adapter stored, or found by an earlier lookup, answer from memory as LMCache's
        # built-in S3 adapter does; only the others cost a HEAD. A key removed behind our back
        # then fails its load, which LMCache treats as a miss, and is forgotten.
        with self._lock:
            known = [self._sizes.get(k) or self._seen.get(k) for k in keys]
        unknown = [k for k, size in zip(keys, known) if size is None]
        looked = iter(await asyncio.gather(*(self.store.astat(self._name(k)) for k in unknown), return_exceptions=True))
        bitmap = Bitmap(len(keys))
        hits = []
        with self._lock:
            for i, (key, size) in enumerate(zip(keys, known)):
                if size is None:
                    info = next(looked)
                    if isinstance(info, BaseException) or info is None or info.size <= 0:
                        continue
                    self._remember(key, info.size)
                bitmap.set(i)
                self._locks[key] += 1
                hits.append(key)
            self._lookups[task_id] = bitmap
        self._lookup_efd.notify()
        if hits:
            self._notify_keys_accessed(hits)

    def query_lookup_and_lock_result(self, task_id: L2TaskId) -> Bitmap | None:
        with self._lock:
            return self._lookups.pop(task_id, None)

    def submit_unlock(self, keys: list[ObjectKey]) -> None:
        with self._lock:
            for key in keys:
                if self._locks.get(key, 0) > 1:
                    self._locks[key] -= 1
                else:
                    self._locks.pop(key, None)

    def is_locked(self, key: ObjectKey) -> bool:
        with self._lock:
            return self._locks.get(key, 0) > 0

    # -- load ------------------------------------------------------------------------------
    def submit_load_task(self, keys: list[ObjectKey], objects: list[MemoryObj]) -> L2TaskId:
        task_id = self._new_task_id()
        asyncio.run_coroutine_threadsafe(self._load(list(keys), list(objects), task_id), self._loop)
        return task_id

    async def _load(self, keys: list[ObjectKey], objects: list[MemoryObj], task_id: L2TaskId) -> None:
        sizes = await asyncio.gather(
            *(self.store.aget_into(self._name(k), o.byte_array) for k, o in zip(keys, objects)), return_exceptions=True
        )
        bitmap = Bitmap(len(keys))
        for i, (obj, size) in enumerate(zip(objects, sizes)):
            if isinstance(size, BaseException):
                log.warning("kvstore L2: loading %s failed: %s", self._name(keys[i]), size)
            elif size == obj.get_size():
                bitmap.set(i)
                continue
            with self._lock:
                self._seen.pop(keys[i], None)
        with self._lock:
            self._loads[task_id] = bitmap
        self._load_efd.notify()

    def query_load_result(self, task_id: L2TaskId) -> Bitmap | None:
        with self._lock:
            return self._loads.pop(task_id, None)

    # -- delete and usage ------------------------------------------------------------------
    def delete(self, keys: list[ObjectKey]) -> None:
        """Remove unlocked keys (blocking, as LMCache's eviction controller expects)."""
        with self._lock:
            deletable = [k for k in keys if not self._locks.get(k)]
        if not deletable:
            return
        # Whether each object was there is not asked (no HEADs): the sizes come from what this adapter stored.
        future = asyncio.run_coroutine_threadsafe(self.store.adiscard_many([self._name(k) for k in deletable]), self._loop)
        try:
            future.result(DELETE_TIMEOUT_S)
        except Exception as exc:
            log.warning("kvstore L2: delete failed: %s", exc)
            return
        with self._lock:
            sizes = [self._sizes.pop(k, 0) for k in deletable]
            for k in deletable:
                self._seen.pop(k, None)
        self._notify_keys_deleted(deletable, sizes)

    def _remember(self, key: ObjectKey, size: int) -> None:
        """Note a key found by a lookup (under the lock); the oldest is forgotten past ``SEEN_KEYS``."""
        self._seen[key] = size
        self._seen.move_to_end(key)
        if len(self._seen) > SEEN_KEYS:
            self._seen.popitem(last=False)

    # -- listing ---------------------------------------------------------------------------
    def list_l2_keys(self, model_name: str | None = None, page_size: int = 500, cursor: str | None = None) -> KeyListPage:
        """One page of the keys stored here, as LMCache's MP object-listing endpoint asks for them.

        One ListObjectsV2 request per page (at most 1000 keys); ``cursor`` is the last object
        name of the page before, so a page resumes where that one ended. Objects that are not
        chunks of this naming (other tools', over-long digested names) are left out.
        """
        if page_size <= 0:
            raise ValueError(f"page_size must be positive (got {page_size})")
        if cursor is not None and not cursor.startswith(_CURSOR):
            raise ValueError(f"not a cursor of this adapter: {cursor!r}")
        after = cursor[len(_CURSOR):] if cursor is not None else None
        prefix = f"{model_name}@" if model_name is not None and self.layout == "flat" else ""
        entries, last, full = [], None, False
        for info in self.store.scan(prefix, start_after=after):
            last = info.key
            key = _object_key(naming.strip_layout(info.key, self.layout))
            if key is not None and (model_name is None or key.model_name == model_name):
                entries.append(KeyEntry(key=key.to_encoded_object_key(), size_bytes=info.size))
            if len(entries) >= min(page_size, LIST_PAGE):
                full = True
                break
        return KeyListPage(entries=tuple(entries), next_page_token=_CURSOR + last if full and last else None)

    def report_status(self) -> dict[str, Any]:
        usage = self.get_usage()
        return {
            "is_healthy": self._thread.is_alive() and not self._closed,
            "type": type(self).__name__,
            "store": self.store.config.url,
            "current_size_bytes": usage.total_bytes_used,
            "max_capacity_bytes": usage.total_capacity_bytes,
        }

    # -- lifecycle -------------------------------------------------------------------------
    def _new_task_id(self) -> L2TaskId:
        with self._lock:
            if self._closed:
                raise KVStoreError("the L2 adapter is closed")
            task_id = self._next_task_id
            self._next_task_id += 1
            return task_id

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.store.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        for efd in (self._store_efd, self._lookup_efd, self._load_efd):
            efd.close()


def _object_key(name: str) -> ObjectKey | None:
    """The ``ObjectKey`` an object name spells, by LMCache's own parser; None for any other object."""
    try:
        return _string_to_object_key(name)
    except (ValueError, TypeError):
        return None
