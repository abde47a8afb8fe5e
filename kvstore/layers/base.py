"""``Layer``: a backend that wraps another and routes every call through ``around`` (``aaround`` for coroutines)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TypeVar

from kvstore.backends.base import Backend, ObjectInfo, OnChunk, ReadResult, aclose_pages, close_pages
from kvstore.config import StoreConfig

T = TypeVar("T")
__all__ = ["Layer", "aclose_pages", "close_pages"]
_OPERATIONS = ("put", "get_into", "get", "head", "delete", "delete_many", "discard_many", "list_pages")


class Layer(Backend):
    """Forwards each operation to ``inner`` through ``around(op, call)``; subclasses override either.

    Every operation has a blocking method and a coroutine twin, and so does the hook: a layer
    that overrides ``around`` overrides ``aaround`` too, keeping what they decide in one helper
    both call (see the retry and breaker layers). The coroutines await the inner backend's, so
    an asynchronous backend is never run on a thread for asyncio callers.
    """

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # A layer written for the blocking API alone must not be skipped by asyncio callers: its
        # coroutines then run its blocking methods (off the loop when the backend blocks).
        for name in _OPERATIONS:
            if name in cls.__dict__ and "a" + name not in cls.__dict__:
                setattr(cls, "a" + name, getattr(Backend, "a" + name))
        if "around" in cls.__dict__ and "aaround" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} overrides around() but not aaround(): asyncio calls would bypass it")

    def __init__(self, inner: Backend, config: StoreConfig) -> None:
        super().__init__(config)
        self.inner = inner
        self.capabilities = inner.capabilities
        self.blocking = inner.blocking

    def around(self, op: str, call: Callable[[], T], nbytes: int = 0) -> T:
        return call()

    async def aaround(self, op: str, call: Callable[[], Awaitable[T]], nbytes: int = 0) -> T:
        return await call()

    # -- blocking ------------------------------------------------------------------------------
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

    # -- coroutines ----------------------------------------------------------------------------
    async def aput(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        return await self.aaround("put", lambda: self.inner.aput(name, data, metadata, if_absent=if_absent), len(data))

    async def aget_into(self, name: str, buffer: memoryview, on_chunk: OnChunk | None = None) -> ReadResult | None:
        return await self.aaround("get_into", lambda: self.inner.aget_into(name, buffer, on_chunk))

    async def aget(self, name: str) -> tuple[bytes | bytearray | memoryview, ReadResult] | None:
        return await self.aaround("get", lambda: self.inner.aget(name))

    async def ahead(self, name: str) -> ObjectInfo | None:
        return await self.aaround("head", lambda: self.inner.ahead(name))

    async def adelete(self, name: str) -> bool:
        return await self.aaround("delete", lambda: self.inner.adelete(name))

    async def adelete_many(self, names: list[str]) -> list[bool]:
        return await self.aaround("delete_many", lambda: self.inner.adelete_many(names))

    async def adiscard_many(self, names: list[str]) -> None:
        return await self.aaround("discard_many", lambda: self.inner.adiscard_many(names))

    async def alist_pages(self, prefix: str, start_after: str | None = None) -> AsyncIterator[Sequence[ObjectInfo]]:
        pages = aiter(self.inner.alist_pages(prefix, start_after))
        try:
            while True:
                page = await self.aaround("list", lambda: anext(pages, None))
                if page is None:
                    return
                yield page
        finally:
            await aclose_pages(pages)

    def close(self) -> None:
        self.inner.close()

    def unwrap(self) -> Backend:
        inner = self.inner
        return inner.unwrap() if isinstance(inner, Layer) else inner
