"""Any fsspec filesystem as an object store: s3fs for S3 profiles, ``fsspec.url_to_fs`` for the rest.

Object names live under a root (the bucket for S3, the URL's path otherwise) as ``ROOT/NAME``.
``FsspecBackend(config)`` is one of two classes. For an S3 profile it is
``kvstore_fsspec.s3.FsspecS3Backend``: the operations are coroutines on s3fs's aiobotocore
client (``AsyncBackend``), which asyncio callers await with no thread per request and blocking
callers run through ``run_bounded`` on s3fs's loop. Any other filesystem is this class itself:
fsspec's blocking API, which the base class runs on its bounded pool for asyncio callers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import fsspec

from kvstore.backends.base import Backend, Capabilities, ObjectInfo, OnChunk, ReadResult, pages_of, read_exactly
from kvstore.errors import (
    AuthError,
    BucketNotFound,
    BufferTooSmall,
    ConfigError,
    IntegrityError,
    KVStoreError,
    StoreTimeout,
    StoreUnavailable,
)


class FsspecBackend(Backend):
    capabilities = Capabilities(conditional_put=True)

    def __new__(cls, config: Any) -> FsspecBackend:
        """An S3 profile gets the asynchronous subclass; every other filesystem this blocking class."""
        chosen: type[FsspecBackend] = cls
        if cls is FsspecBackend and config.is_s3:
            from kvstore_fsspec.s3 import FsspecS3Backend

            chosen = FsspecS3Backend
        return super().__new__(chosen)

    def __init__(self, config) -> None:
        super().__init__(config)
        self.fs, self.root = self._filesystem(config)

    def _filesystem(self, config) -> tuple[Any, str]:
        """The fsspec filesystem, and the root object names live under."""
        self.capabilities = Capabilities(metadata=False, conditional_put=False)  # S3 features here
        if config.profile == "file":
            from fsspec.implementations.local import LocalFileSystem

            return LocalFileSystem(), config.location.rstrip("/")
        try:
            fs, root = fsspec.url_to_fs(config.location, skip_instance_cache=True)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"fsspec cannot open {config.location!r}: {exc}", key="kvstore_url") from exc
        return fs, root.rstrip("/")

    # -- names and errors (filesystems other than S3) -----------------------------------------
    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _name(self, path: str) -> str:
        return path[len(self.root) + 1:] if path.startswith(self.root + "/") else path

    def _error(self, exc: BaseException, what: str) -> KVStoreError:
        if isinstance(exc, KVStoreError):
            return exc
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if isinstance(exc, PermissionError):
            return AuthError(f"{what}: access denied ({text})")
        if isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower():
            return StoreTimeout(f"{what}: no answer within the timeout ({self.config.timeout_s:g} s)")
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            return StoreUnavailable(f"{what}: {text}", connection=True)
        return StoreUnavailable(f"{what}: {type(exc).__name__}: {text}", retryable=False)

    def _check_root(self) -> None:
        """After a miss: ``BucketNotFound`` when the root itself is absent."""
        try:
            exists = self.fs.exists(self.root)
        except Exception as exc:
            raise self._error(exc, "check root") from exc
        if not exists:
            raise BucketNotFound(f"{self.root!r} does not exist")

    # -- operations ----------------------------------------------------------------------------
    def put(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        path = self._path(name)
        try:
            self._put_file(path, data, if_absent)
        except FileNotFoundError:
            self._check_root()
            raise
        except Exception as exc:
            raise self._error(exc, f"PUT {name!r}") from exc

    def _put_file(self, path: str, data: memoryview, if_absent: bool) -> None:
        if if_absent:
            raise KVStoreError("conditional put is not supported by this fsspec filesystem")
        if not self.fs.exists(self.root):
            raise BucketNotFound(f"{self.root!r} does not exist")
        self.fs.makedirs(self.fs._parent(path), exist_ok=True)
        # autocommit=False: written aside and moved into place, so readers never see a torn object
        with self.fs.open(path, "wb", autocommit=False) as f:
            f.write(data)
            f.commit()

    def get_into(self, name: str, buffer: memoryview, on_chunk: OnChunk | None = None) -> ReadResult | None:
        path = self._path(name)
        try:
            with self.fs.open(path, "rb", cache_type="none") as f:
                size = f.size
                # Not local=True: a remote filesystem's readinto waits on the network.
                read_exactly(f.readinto, name, size, buffer, on_chunk)
            return ReadResult(size, {})
        except FileNotFoundError:
            self._check_root()
            return None
        except (BufferTooSmall, IntegrityError):
            raise
        except Exception as exc:
            raise self._error(exc, f"GET {name!r}") from exc

    def head(self, name: str) -> ObjectInfo | None:
        try:
            info = self.fs.info(self._path(name))
        except FileNotFoundError:
            self._check_root()
            return None
        except Exception as exc:
            raise self._error(exc, f"HEAD {name!r}") from exc
        if info.get("type") != "file":
            return None
        return _info(name, info)

    def delete(self, name: str) -> bool:
        if self.head(name) is None:
            return False
        try:
            self.fs.rm_file(self._path(name))
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise self._error(exc, f"DELETE {name!r}") from exc
        return True

    def list_pages(self, prefix: str, start_after: str | None = None) -> Iterator[Sequence[ObjectInfo]]:
        # A generic filesystem has no pages: find() walks the directory holding the prefix whole,
        # and its answer is sorted here (S3's order), then handed out a page at a time.
        directory = prefix.rpartition("/")[0]
        start = f"{self.root}/{directory}" if directory else self.root
        try:
            if not self.fs.exists(self.root):
                raise BucketNotFound(f"{self.root!r} does not exist")
            found = self.fs.find(start, detail=True)
        except FileNotFoundError:
            return
        except Exception as exc:
            raise self._error(exc, f"LIST {prefix!r}") from exc
        infos = sorted((_info(self._name(path), info) for path, info in found.items() if info.get("type") == "file"),
                       key=lambda i: i.key)
        yield from pages_of(infos, prefix, start_after)

    def close(self) -> None:
        # fsspec owns its filesystems' loop thread and connections for the process; the base
        # class's pool (asyncio callers of a blocking filesystem) is ours.
        super().close()


def _info(name: str, info: Mapping) -> ObjectInfo:
    modified: Any = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if hasattr(modified, "timestamp"):
        modified = modified.timestamp()
    return ObjectInfo(name, int(info.get("size") or 0), {},
                      modified if isinstance(modified, (int, float)) else None, info.get("ETag"))
