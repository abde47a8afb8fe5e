"""Any fsspec filesystem as an object store: s3fs for S3 profiles, ``fsspec.url_to_fs`` for the rest.

Object names live under a root (the bucket for S3, the URL's path otherwise) as ``ROOT/NAME``.
The sync API is used: fsspec runs async filesystems (s3fs) on its own loop thread, so calls
from many threads at once are safe. For S3 a read is one GetObject streamed into the caller's
buffer (s3fs's ``cat_file`` would send a HEAD first and return a fresh copy).
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping

import fsspec
from fsspec.asyn import sync

from kvstore.backends.base import (
    PIECE, Backend, Capabilities, ObjectInfo, OnChunk, ReadResult, ca_bundle_pem, read_exactly,
)
from kvstore.backends.s3errors import from_status
from kvstore.errors import (
    AuthError, BucketNotFound, BufferTooSmall, ConfigError, IntegrityError, KVStoreError,
    PreconditionFailed, StoreTimeout, StoreUnavailable,
)

_READ_CHUNK = 8 * 1024 * 1024


class FsspecBackend(Backend):
    capabilities = Capabilities(conditional_put=True)

    def __init__(self, config) -> None:
        super().__init__(config)
        if config.is_s3:
            self.fs = _s3_filesystem(config)
            self.root = config.bucket
        elif config.profile == "file":
            from fsspec.implementations.local import LocalFileSystem

            self.fs = LocalFileSystem()
            self.root = config.location.rstrip("/")
        else:
            try:
                self.fs, self.root = fsspec.url_to_fs(config.location, skip_instance_cache=True)
            except (ImportError, ValueError) as exc:
                raise ConfigError(f"fsspec cannot open {config.location!r}: {exc}", key="kvstore_url") from None
            self.root = self.root.rstrip("/")
        self._s3 = config.is_s3
        if not self._s3:  # metadata and create-if-absent are S3 features here
            self.capabilities = Capabilities(metadata=False, conditional_put=False)

    # -- names and errors ---------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _name(self, path: str) -> str:
        return path[len(self.root) + 1:] if path.startswith(self.root + "/") else path

    def _error(self, exc: BaseException, what: str) -> KVStoreError:
        if isinstance(exc, KVStoreError):
            return exc
        text = str(exc)
        if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
            return BucketNotFound(f"{what}: bucket {self.config.bucket!r} does not exist")
        if isinstance(exc, PermissionError):
            return AuthError(f"{what}: access denied ({_first_line(text)})")
        response = getattr(exc, "response", None) or getattr(getattr(exc, "__cause__", None), "response", None)
        if isinstance(response, dict) and "ResponseMetadata" in response:
            status = response["ResponseMetadata"].get("HTTPStatusCode") or 0
            return from_status(status, response.get("Error", {}).get("Code"), what)
        if "PreconditionFailed" in text:
            return PreconditionFailed(f"{what}: already exists")
        if isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower() or "timed out" in text.lower():
            return StoreTimeout(f"{what}: no answer within the timeout ({self.config.timeout_s:g} s)")
        if _is_connection(exc) or (isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)):
            return StoreUnavailable(f"{what}: {_first_line(text)}", connection=True)
        return StoreUnavailable(f"{what}: {type(exc).__name__}: {_first_line(text)}", retryable=False)

    def _check_root(self) -> None:
        """After a miss: ``BucketNotFound`` when the root itself is absent."""
        try:
            exists = self.fs.exists(self.root)
        except Exception as exc:  # noqa: BLE001 - fsspec implementations raise many kinds
            raise self._error(exc, "check root") from None
        if not exists:
            raise BucketNotFound(f"{self.root!r} does not exist")

    # -- operations ----------------------------------------------------------------------------
    def put(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        path = self._path(name)
        try:
            if self._s3:
                extra = {"Metadata": dict(metadata)} if metadata else {}
                self.fs.pipe_file(path, _as_bytes(data), mode="create" if if_absent else "overwrite",
                                  chunksize=self.config.part_size, **extra)
            else:
                self._put_file(path, data, if_absent)
        except FileNotFoundError:
            self._check_root()
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"PUT {name!r}") from None

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
            if self._s3:
                return sync(self.fs.loop, self._s3_read_into, name, path, buffer, on_chunk)
            return self._read_file_into(name, path, buffer, on_chunk)
        except FileNotFoundError:
            self._check_root()
            return None
        except (BufferTooSmall, IntegrityError):
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"GET {name!r}") from None

    async def _s3_read_into(self, name: str, path: str, buffer: memoryview, on_chunk: OnChunk | None) -> ReadResult:
        bucket, key, _ = self.fs.split_path(path)
        response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            size = response["ContentLength"]
            if size > len(buffer):
                raise BufferTooSmall(name, size, len(buffer))
            done = 0
            while done < size:
                chunk = await body.read(min(PIECE if on_chunk else _READ_CHUNK, size - done))
                if not chunk:
                    raise IntegrityError(f"{name!r}: {done} of {size} bytes arrived")
                buffer[done:done + len(chunk)] = chunk
                if on_chunk:
                    on_chunk(done, buffer[done:done + len(chunk)])
                done += len(chunk)
        finally:
            body.close()
        return ReadResult(size, dict(response.get("Metadata") or {}))

    def _read_file_into(self, name: str, path: str, buffer: memoryview, on_chunk: OnChunk | None) -> ReadResult:
        with self.fs.open(path, "rb", cache_type="none") as f:
            size = f.size
            read_exactly(f.readinto, name, size, buffer, on_chunk)
        return ReadResult(size, {})

    def head(self, name: str) -> ObjectInfo | None:
        path = self._path(name)
        try:
            if self._s3:
                bucket, key, _ = self.fs.split_path(path)
                out = self.fs.call_s3("head_object", Bucket=bucket, Key=key)
                modified = out.get("LastModified")
                return ObjectInfo(name, out["ContentLength"], dict(out.get("Metadata") or {}),
                                  modified.timestamp() if modified else None, out.get("ETag"))
            info = self.fs.info(path)
        except FileNotFoundError:
            self._check_root()
            return None
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"HEAD {name!r}") from None
        if info.get("type") != "file":
            return None
        return _info(name, info)

    def delete(self, name: str) -> bool:
        path = self._path(name)
        if self.head(name) is None:
            return False
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"DELETE {name!r}") from None
        return True

    def delete_many(self, names: list[str]) -> list[bool]:
        present = [self.head(name) is not None for name in names]
        doomed = [self._path(n) for n, there in zip(names, present) if there]
        if doomed:
            try:
                self.fs.rm(doomed)  # s3fs: DeleteObjects, 1000 names a request
            except FileNotFoundError:
                pass
            except Exception as exc:  # noqa: BLE001
                raise self._error(exc, f"DELETE {len(doomed)} objects") from None
        return present

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # find() walks a directory: start at the one holding the prefix, filter the rest here.
        directory = prefix.rpartition("/")[0]
        start = f"{self.root}/{directory}" if directory else self.root
        try:
            if not self.fs.exists(self.root):
                raise BucketNotFound(f"{self.root!r} does not exist")
            found = self.fs.find(start, detail=True)
        except FileNotFoundError:
            return
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"LIST {prefix!r}") from None
        for path, info in found.items():
            name = self._name(path)
            if name.startswith(prefix) and info.get("type") == "file":
                yield _info(name, info)

    def close(self) -> None:
        pass  # fsspec owns its loop thread and connection pool for the process


def _info(name: str, info: Mapping) -> ObjectInfo:
    modified = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if hasattr(modified, "timestamp"):
        modified = modified.timestamp()
    return ObjectInfo(name, int(info.get("size") or 0), {},
                      modified if isinstance(modified, (int, float)) else None, info.get("ETag"))


def _as_bytes(data: memoryview) -> bytes | bytearray:
    """botocore takes bytes, not views: reuse the object under the view when it is whole, else copy once."""
    whole = data.obj
    if isinstance(whole, (bytes, bytearray)) and len(whole) == data.nbytes:
        return whole
    return bytes(data)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


_CONNECTION_NAMES = re.compile(r"Connect|EndpointConnectionError|ServerDisconnected|ClientOSError")


def _is_connection(exc: BaseException) -> bool:
    while exc is not None:
        if _CONNECTION_NAMES.search(type(exc).__name__):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _s3_filesystem(config):
    ca_bundle_pem(config)  # botocore takes the path and reads it at the first request: fail now instead
    try:
        import s3fs
    except ImportError:
        from kvstore.errors import BackendUnavailable

        raise BackendUnavailable("fsspec", "s3fs", "fsspec") from None
    credentials = config.credentials
    kwargs: dict = {}
    if credentials.source in ("static", "env"):
        kwargs.update(key=credentials.access_key_id, secret=credentials.secret_access_key.reveal(),
                      token=credentials.session_token.reveal() if credentials.session_token else None)
    elif credentials.source == "profile":
        kwargs["profile"] = credentials.profile_name
    fs = s3fs.S3FileSystem(
        endpoint_url=config.base_endpoint,
        use_ssl=config.tls,
        client_kwargs={"region_name": config.region, **({"verify": config.ca_bundle} if config.ca_bundle else {})},
        config_kwargs={
            "s3": {"addressing_style": config.addressing},
            "connect_timeout": config.connect_timeout_s,
            "read_timeout": config.timeout_s,
            "retries": {"total_max_attempts": 1},  # the retry layer owns retries
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            **({"proxies": {"http": config.proxy_url, "https": config.proxy_url}} if config.proxy_url else {}),
        },
        skip_instance_cache=True,
        use_listings_cache=False,
        **kwargs,
    )
    fs.retries = 1  # s3fs's own retry loop, on top of botocore's
    return fs
