"""``Layer``: a backend that wraps another and routes every call through ``around``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

from kvstore.backends.base import Backend, ObjectInfo, OnChunk, ReadResult
from kvstore.config import StoreConfig

T = TypeVar("T")


class Layer(Backend):
    """Forwards each operation to ``inner`` through ``around(op, call)``; subclasses override either."""

    def __init__(self, inner: Backend, config: StoreConfig) -> None:
        super().__init__(config)
        self.inner = inner
        self.capabilities = inner.capabilities

    def around(self, op: str, call: Callable[[], T], nbytes: int = 0) -> T:
        return call()

    def put(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        return self.around("put", lambda: self.inner.put(name, data, metadata, if_absent=if_absent), len(data))

    def get_into(self, name: str, buffer: memoryview, on_chunk: OnChunk | None = None) -> ReadResult | None:
        return self.around("get_into", lambda: self.inner.get_into(name, buffer, on_chunk))

    def get(self, name: str) -> tuple[bytes | bytearray | memoryview, ReadResult] | None:
        return self.around("get", lambda: self.inner.get(name))

    def head(self, name: str) -> ObjectInfo | None:
        return self.around("head", lambda: self.inner.head(name))

    def delete(self, name: str) -> bool:
        return self.around("delete", lambda: self.inner.delete(name))

    def delete_many(self, names: list[str]) -> list[bool]:
        return self.around("delete_many", lambda: self.inner.delete_many(names))

    def discard_many(self, names: list[str]) -> None:
        return self.around("discard_many", lambda: self.inner.discard_many(names))

    def list_pages(self, prefix: str, start_after: str | None = None) -> Iterator[Sequence[ObjectInfo]]:
        # Each page is one operation: timed, counted and guarded on its own, never the whole listing.
        pages = iter(self.inner.list_pages(prefix, start_after))
        try:
            while True:
                page = self.around("list", lambda: next(pages, None))
                if page is None:
                    return
                yield page
        finally:
            close_pages(pages)

    def close(self) -> None:
        self.inner.close()

    def unwrap(self) -> Backend:
        inner = self.inner
        return inner.unwrap() if isinstance(inner, Layer) else inner


def close_pages(pages: object) -> None:
    """Close a listing left part-way (a generator holding a directory or a connection), now rather than at GC."""
    close = getattr(pages, "close", None)
    if close is not None:
        close()
