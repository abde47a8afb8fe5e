"""Non-MP remote storage plugin: ``KVStoreConnectorAdapter`` and its ``RemoteConnector``.

LMCache config::

    remote_storage_plugins: ["kvstore"]
    extra_config:
      remote_storage_plugin.kvstore.module_path: kvstore.lmcache
      remote_storage_plugin.kvstore.class_name: KVStoreConnectorAdapter
      kvstore_url: "s3://my-bucket/kv"

Every call goes through the store's asyncio API, so nothing blocks LMCache's event loop; reads
land straight in LMCache's buffers (``get_into``), and a chunk's layout travels as object
metadata so short last chunks and fresh processes work.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.storage_backend.connector import ConnectorAdapter, ConnectorContext, extract_plugin_type
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

import kvstore
from kvstore import naming
from kvstore.errors import BufferTooSmall, KVStoreError
from kvstore.lmcache import chunks

log = logging.getLogger(__name__)
PLUGIN_TYPE = "kvstore"
PING_NAME = "kvstore-ping"  # a name stat'ed to check the store answers; it need not exist
CHAIN_MEMORY = 1 << 16  # predecessors remembered from lookups, for the chain metadata of later writes


def open_store_from(extra_config: Mapping[str, Any] | None) -> kvstore.KVStore:
    """The store an LMCache ``extra_config`` names through ``kvstore_url`` (or ``s3_endpoint``)."""
    extra = dict(extra_config or {})
    return kvstore.open(extra.get("kvstore_url"), extra)


class KVStoreConnector(RemoteConnector):
    """LMCache ``RemoteConnector`` over a kvstore ``KVStore``."""

    def __init__(self, config: Any, metadata: Any, local_cpu_backend: Any, store: kvstore.KVStore | None = None) -> None:
        super().__init__(config, metadata)
        self.local_cpu_backend = local_cpu_backend
        self.store = store if store is not None else open_store_from(config.extra_config)
        self.layout = self.store.config.lmcache.key_layout
        self.full_layout = chunks.ChunkLayout(list(self.meta_shapes), list(self.meta_dtypes), self.meta_fmt)
        self._prev: OrderedDict[str, str] = OrderedDict()
        self._prev_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<KVStoreConnector {self.store.config.url}>"

    def name_of(self, key: CacheEngineKey) -> str:
        return naming.chunk_name(key.to_string(), self.layout)

    # -- chains ----------------------------------------------------------------------------
    def remember_chain(self, keys: Sequence[CacheEngineKey]) -> None:
        """Note each key's predecessor: LMCache hands lookups and writes a run of consecutive chunks.

        A run need not start at the prompt's first chunk (a faster tier may have hit the head),
        so only predecessors are recorded, never absolute positions.
        """
        texts = [k.to_string() for k in keys]
        with self._prev_lock:
            for prev, text in zip(texts, texts[1:]):
                self._prev[text] = naming.key_hash(prev)
                self._prev.move_to_end(text)
            while len(self._prev) > CHAIN_MEMORY:
                self._prev.popitem(last=False)

    def chain_metadata(self, key: CacheEngineKey) -> dict[str, str]:
        """``lmcache-prev`` for ``key`` when a lookup or a batched write showed its predecessor."""
        with self._prev_lock:
            prev = self._prev.get(key.to_string())
        return naming.chain_metadata(None, prev)

    # -- presence --------------------------------------------------------------------------
    async def exists(self, key: CacheEngineKey) -> bool:
        return await self.store.aexists(self.name_of(key))

    def exists_sync(self, key: CacheEngineKey) -> bool:
        return self.store.exists(self.name_of(key))

    async def batched_async_contains(self, lookup_id: str, keys: list[CacheEngineKey], pin: bool = False) -> int:
        """How many keys, from the first, are stored (a failed check counts as a miss)."""
        self.remember_chain(keys)
        found = await asyncio.gather(*(self.exists(k) for k in keys), return_exceptions=True)
        return _prefix_length(found)

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: list[CacheEngineKey]) -> int:
        self.remember_chain(keys)
        return _prefix_length(self.store.exists_many([self.name_of(k) for k in keys]))

    # -- reads -----------------------------------------------------------------------------
    async def get(self, key: CacheEngineKey) -> MemoryObj | None:
        """The chunk in a buffer from LocalCPUBackend, or None (miss, no memory, store failure).

        One GET and no HEAD: the read lands in a full chunk's buffer and hands back the object's
        size and layout metadata with it. A short (last) chunk is then copied into a buffer of
        its own shape, a copy of a partial chunk rather than a round trip for every chunk.
        """
        name, full = self.name_of(key), self.full_layout
        memory_obj = self.local_cpu_backend.allocate(full.shapes, full.dtypes, full.fmt)
        if memory_obj is None:
            return None
        try:
            info = await self.store.aget_into(name, memory_obj.byte_array, info=True)
        except BaseException as exc:  # the buffer is ours until returned, whatever happens
            memory_obj.ref_count_down()
            if isinstance(exc, BufferTooSmall):
                log.warning("kvstore: %s holds %d bytes, more than a chunk of this model; skipped", name, exc.needed)
                return None
            if not isinstance(exc, KVStoreError):
                raise
            log.warning("kvstore: cannot read %s: %s", name, exc)
            return None
        if info is None:
            memory_obj.ref_count_down()
            return None
        layout = chunks.layout_for(info.size, info.metadata, full)
        if layout == full:
            return memory_obj
        try:
            if layout is None:
                log.warning("kvstore: %s holds %d bytes that fit no chunk layout of this model; skipped", name, info.size)
                return None
            short = self.local_cpu_backend.allocate(layout.shapes, layout.dtypes, layout.fmt)
            if short is not None:
                _bytes(short)[:] = _bytes(memory_obj)[: info.size]
            return short
        finally:
            memory_obj.ref_count_down()

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: list[CacheEngineKey]) -> list[MemoryObj | None]:
        return list(await asyncio.gather(*(self.get(k) for k in keys)))

    # batched_get_non_blocking: the base class's version (concurrent gets, the successful prefix,
    # later buffers released) is exactly right on top of ``get``.

    # -- writes ----------------------------------------------------------------------------
    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        """Store the chunk's true bytes, layout and (when known) predecessor. Raises on failure; the
        caller owns the reference."""
        layout = chunks.layout_of(memory_obj)
        await self.store.aput(self.name_of(key), memory_obj.byte_array, {**layout.metadata(), **self.chain_metadata(key)})

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: list[CacheEngineKey], memory_objs: list[MemoryObj]) -> None:
        self.remember_chain(keys)
        results = await asyncio.gather(*(self.put(k, m) for k, m in zip(keys, memory_objs)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            log.error("kvstore: %d of %d chunk writes failed, first: %s", len(failures), len(keys), failures[0])
            raise failures[0]

    def remove_sync(self, key: CacheEngineKey) -> bool:
        return self.store.delete(self.name_of(key))

    # -- misc ------------------------------------------------------------------------------
    async def list(self) -> list[str]:
        """Stored chunk names, as LMCache spells keys (``/`` shown as ``_``)."""
        return [naming.strip_layout(name, self.layout) async for name in self.store.alist()]

    def support_ping(self) -> bool:
        return True

    async def ping(self) -> int:
        """0 when the store answers, 1 otherwise."""
        try:
            await self.store.astat(PING_NAME)
        except KVStoreError as exc:
            log.warning("kvstore: ping failed: %s", exc)
            return 1
        return 0

    def shutdown(self) -> None:
        """Release the store now; calls in flight fail or are cancelled instead of being awaited."""
        self.store.close()

    async def close(self) -> None:
        self.shutdown()


def _prefix_length(found: list[Any]) -> int:
    for i, hit in enumerate(found):
        if hit is not True:
            return i
    return len(found)


class KVStoreConnectorAdapter(ConnectorAdapter):
    """Matches ``plugin://kvstore`` (and ``plugin://kvstore.<instance>``) and builds a ``KVStoreConnector``."""

    def __init__(self) -> None:
        super().__init__(f"plugin://{PLUGIN_TYPE}")

    def can_parse(self, url: str) -> bool:
        return url.startswith("plugin://") and extract_plugin_type(url[len("plugin://"):]) == PLUGIN_TYPE

    def create_connector(self, context: ConnectorContext) -> RemoteConnector:
        if context.config is None or context.metadata is None:
            raise KVStoreError("the kvstore connector needs LMCache's config and metadata")
        return KVStoreConnector(context.config, context.metadata, context.local_cpu_backend)


def _bytes(memory_obj: MemoryObj) -> memoryview:
    return memoryview(memory_obj.byte_array).cast("B")
