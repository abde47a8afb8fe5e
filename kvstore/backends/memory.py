"""Process-local, thread-safe store: the reference implementation the conformance suite is checked on."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from kvstore.backends import call
from kvstore.backends.base import LIST_PAGE, Backend, Capabilities, ObjectInfo, OnChunk, ReadResult
from kvstore.errors import BufferTooSmall, PreconditionFailed

if TYPE_CHECKING:
    from kvstore.config import StoreConfig

# Stores of the same name share their objects, as two clients of one bucket would.
_SPACES: dict[str, dict[str, tuple[bytes, dict[str, str], float]]] = {}
_SPACES_LOCK = threading.Lock()


class MemoryBackend(Backend):
    capabilities = Capabilities(conditional_put=True)
    blocking = False  # nothing here waits: asyncio callers run these methods inline

    def __init__(self, config: StoreConfig) -> None:
        super().__init__(config)
        with _SPACES_LOCK:
            self._objects = _SPACES.setdefault(config.location, {})
        self._lock = _SPACES_LOCK

    def put(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        value = (bytes(data), dict(metadata), time.time())
        with self._lock:
            if if_absent and name in self._objects:
                raise PreconditionFailed(f"{name!r} already exists")
            self._objects[name] = value

    def get_into(self, name: str, buffer: memoryview, on_chunk: OnChunk | None = None) -> ReadResult | None:
        with self._lock:
            entry = self._objects.get(name)
        if entry is None:
            return None
        data, metadata, _ = entry
        if len(data) > len(buffer):
            raise BufferTooSmall(name, len(data), len(buffer))
        call.copy_into(buffer[: len(data)], data)
        return ReadResult(len(data), dict(metadata))

    def get(self, name: str) -> tuple[bytes, ReadResult] | None:
        with self._lock:
            entry = self._objects.get(name)
        return None if entry is None else (entry[0], ReadResult(len(entry[0]), dict(entry[1])))

    def head(self, name: str) -> ObjectInfo | None:
        with self._lock:
            entry = self._objects.get(name)
        return None if entry is None else ObjectInfo(name, len(entry[0]), dict(entry[1]), entry[2])

    def delete(self, name: str) -> bool:
        with self._lock:
            return self._objects.pop(name, None) is not None

    def list_pages(self, prefix: str, start_after: str | None = None) -> Iterator[list[ObjectInfo]]:
        # The names are sorted once (references only: the objects are in memory anyway); each page
        # is read under the lock, so an object deleted since is left out, never shown stale.
        with self._lock:
            names = sorted(n for n in self._objects if n.startswith(prefix) and (start_after is None or n > start_after))
        for start in range(0, len(names), LIST_PAGE):
            page = []
            with self._lock:
                for name in names[start:start + LIST_PAGE]:
                    entry = self._objects.get(name)
                    if entry is not None:
                        page.append(ObjectInfo(name, len(entry[0]), dict(entry[1]), entry[2]))
            yield page
