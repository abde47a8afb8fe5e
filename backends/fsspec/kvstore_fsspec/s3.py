"""The S3 side of the fsspec backend: aiobotocore calls on s3fs's own loop, written once as coroutines.

s3fs's blocking wrappers wait without end (a server that withholds ``100 Continue`` kept a PUT
running for minutes) and its ``exists()`` turns every error into False. So every request is
made here on the aiobotocore client s3fs holds. That client belongs to s3fs's loop
(``fs.loop``, fsspec's IO thread), so each request runs there, whoever awaits it
(``on_loop``): an asyncio caller's coroutine schedules it on that loop and awaits it from its
own with no thread in between, for what is left of the operation's deadline, and cancels it on
s3fs's loop when the awaiting task is cancelled or the caller's buffer lease is revoked. The
blocking methods are ``AsyncBackend``'s mirrors, run by ``run_bounded`` on s3fs's loop itself.
Errors are translated from botocore's own answer (status and S3 code), never guessed from a
message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from kvstore.backends import call
from kvstore.backends.base import PIECE, ObjectInfo, OnChunk, ReadResult, ca_bundle_pem
from kvstore.backends.coroutines import CANCEL_GRACE_S, AsyncBackend, LoopThread, asyncio_running_loop, future_result
from kvstore.backends.s3delete import HeadThenDelete
from kvstore.backends.s3errors import from_status
from kvstore.backends.s3probe import BucketProbe, crc32c_b64, crc32c_b64_of
from kvstore.errors import (
    BackendUnavailable,
    BucketNotFound,
    BufferTooSmall,
    IntegrityError,
    KVStoreError,
    StoreTimeout,
    StoreUnavailable,
)
from kvstore_fsspec.backend import FsspecBackend

T = TypeVar("T")
_HEAD_CONCURRENCY = 16
_DELETE_BATCH = 1000
_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}
# A checksum the server computed differently: the body was damaged on the way, so sending it
# again may well succeed.
_RESEND_CODES = {"BadDigest", "XAmzContentChecksumMismatch", "XAmzContentSHA256Mismatch"}
_CONNECTION_NAMES = re.compile(r"Connect|ServerDisconnected|ClientOSError|ClientPayloadError|ResponseStreamingError")
# How long close() waits for the client's connections to close on s3fs's loop.
_CLOSE_TIMEOUT_S = 2.0
log = logging.getLogger(__name__)


async def on_loop(loop: asyncio.AbstractEventLoop, make: Callable[[], Awaitable[T]], what: str, timeout_s: float) -> T:
    """Await ``make()`` run on ``loop``, from whichever loop is running, within the call's deadline.

    From another loop it is scheduled on ``loop`` (in a copy of the caller's context, so it sees
    the same ``call.current()``) and awaited without a thread in between. At the deadline it is
    cancelled there, given ``CANCEL_GRACE_S`` to end, and ``StoreTimeout`` is raised; a cancel
    of the awaiting task cancels it there too and propagates; a revoke of the caller's buffer
    lease (``close()``) cancels it and raises ``CallAbandoned``. On ``loop`` itself (the
    blocking mirror, whose ``run_bounded`` watches the lease) it is awaited under the deadline.
    The coroutine's own exceptions come through unchanged; a ``TimeoutError`` of its own must be
    a ``KVStoreError`` (``StoreTimeout``), or it reads as the deadline.
    """
    budget = call.remaining(timeout_s)
    if budget <= 0:
        raise StoreTimeout(f"{what}: the operation's deadline ({timeout_s:g} s) has passed")
    if asyncio.get_running_loop() is loop:
        try:
            return await asyncio.wait_for(make(), budget)
        except asyncio.TimeoutError as exc:
            if isinstance(exc, KVStoreError):  # the coroutine's own StoreTimeout
                raise
            raise StoreTimeout(f"{what}: no answer within the deadline ({timeout_s:g} s)") from exc

    ended: concurrent.futures.Future[None] = concurrent.futures.Future()

    async def guarded() -> T:
        try:
            return await make()
        finally:
            ended.set_result(None)

    future = asyncio.run_coroutine_threadsafe(guarded(), loop)
    lease = call.lease()
    if lease is not None:
        lease.on_revoke(future.cancel)
    try:
        return await asyncio.wait_for(future_result(future), budget)
    except asyncio.TimeoutError as exc:
        if isinstance(exc, KVStoreError):  # the coroutine's own StoreTimeout (it raises no other kind)
            raise
        future.cancel()
        with contextlib.suppress(Exception):  # it ends at its next await: wait for that, briefly
            await asyncio.wait_for(future_result(ended), CANCEL_GRACE_S)
        raise StoreTimeout(f"{what}: no answer within the deadline ({timeout_s:g} s)") from exc
    except concurrent.futures.CancelledError as exc:  # cancelled over there: the lease was revoked
        raise call.CallAbandoned(f"{what}: the call was abandoned") from exc
    except asyncio.CancelledError:
        future.cancel()  # the awaiting task was cancelled: so is the request, on s3fs's loop
        raise


class _S3fsLoop(LoopThread):
    """s3fs's own loop (fsspec's IO thread) lent to the blocking mirrors; fsspec keeps it running."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:  # starts no thread: the loop is fsspec's
        self.loop = loop

    def close(self) -> None:
        pass


class FsspecS3Backend(HeadThenDelete, AsyncBackend, FsspecBackend):
    """One bucket through s3fs's aiobotocore client; names are full object names (prefix included).

    What ``FsspecBackend(config)`` is for an S3 profile: its coroutines are the operations, and
    the blocking methods run them on s3fs's loop (``AsyncBackend``'s mirrors).
    """

    def __init__(self, config) -> None:
        super().__init__(config)
        self.bucket = config.bucket
        self._probe = BucketProbe()
        # The mirrors' loop is s3fs's, where the client lives: no loop thread of our own.
        self._loop_thread = _S3fsLoop(self.fs.loop)
        self._client_closed = False

    def _filesystem(self, config) -> tuple[Any, str]:
        # skip_instance_cache: the filesystem, its session and its client are this backend's alone,
        # so close() may close them without breaking another store on the same endpoint.
        return _s3_filesystem(config), config.bucket

    def _loop(self) -> asyncio.AbstractEventLoop:
        if self._loop_closed:
            raise StoreUnavailable("the backend is closed", retryable=False)
        return self.fs.loop

    def close(self) -> None:
        """Close the aiobotocore client s3fs made for this backend (its sockets), on s3fs's loop. Idempotent.

        The loop itself is fsspec's and keeps running. Bounded by ``_CLOSE_TIMEOUT_S``; a backend
        that never made a request has no client to close.
        """
        with self._loop_lock:
            done, self._client_closed = self._client_closed, True
        super().close()  # from here on no request starts (_run and _loop refuse)
        if not done:
            _close_client(self.fs)

    # -- running and errors -------------------------------------------------------------------
    async def _run(self, what: str, work: Callable[[Any], Awaitable[T]]) -> T:
        """``await work(client)`` on s3fs's loop within the deadline; failures as kvstore errors."""
        if self._loop_closed:
            raise StoreUnavailable(f"{what}: the backend is closed", retryable=False)

        async def go() -> T:
            try:
                await self.fs.set_session()
                return await work(await self.fs.get_s3(self.bucket))
            except KVStoreError:
                raise
            except Exception as exc:
                raise self._error(exc, what) from exc

        return await on_loop(self.fs.loop, go, what, self.config.timeout_s)

    def _error(self, exc: BaseException, what: str) -> KVStoreError:
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and "ResponseMetadata" in response:
            status = response["ResponseMetadata"].get("HTTPStatusCode") or 0
            code = response.get("Error", {}).get("Code")
            if code == str(status):  # botocore's stand-in when the answer had no S3 error code
                code = None
            if code == "NoSuchBucket":
                self._probe.forget()
                return BucketNotFound(f"{what}: bucket {self.bucket!r} does not exist")
            if code in _RESEND_CODES:
                return StoreUnavailable(f"{what}: HTTP {status} {code} (the body was damaged on the way)", status=status)
            return from_status(status, code, what)
        name = type(exc).__name__
        if name == "IncompleteReadError":
            return IntegrityError(f"{what}: the connection ended before the whole body arrived")
        if isinstance(exc, TimeoutError) or "Timeout" in name:
            return StoreTimeout(f"{what}: no answer within the timeout ({self.config.timeout_s:g} s)")
        if _is_connection(exc) or isinstance(exc, OSError):
            return StoreUnavailable(f"{what}: {name}: {_first_line(str(exc))}", connection=True)
        return StoreUnavailable(f"{what}: {name}: {_first_line(str(exc))}", retryable=False)

    def _is_miss(self, exc: BaseException) -> bool:
        """A 404 for the key; a bare one (HEAD has no body) is settled by the bucket probe."""
        response = getattr(exc, "response", None)
        if not isinstance(response, dict) or response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
            return False
        code = response.get("Error", {}).get("Code")
        if code not in _MISSING_KEY:
            return False
        if code == "NoSuchKey":  # S3 says so only about a bucket that exists
            self._probe.seen()
        return True

    async def _confirm_bucket(self, name: str) -> None:
        async def probe() -> None:
            await self._run(f"probe bucket {self.bucket!r}",
                            lambda s3: s3.list_objects_v2(Bucket=self.bucket, Prefix=name, MaxKeys=1))

        await self._probe.confirm(probe)

    # -- operations ----------------------------------------------------------------------------
    async def aput(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        # With checksums on, the server checks the bytes that arrive against the CRC32C of the bytes
        # sent: computed here, not copied from the metadata, which a caller may set to anything.
        checked = crc32c_b64(metadata) is not None
        extra: dict[str, Any] = {"Metadata": dict(metadata)} if metadata else {}
        match = {"IfNoneMatch": "*"} if if_absent else {}
        if len(data) <= self.config.part_size:
            checksum = {"ChecksumCRC32C": crc32c_b64_of(data)} if checked else {}
            await self._run(f"PUT {name!r}", lambda s3: s3.put_object(
                Bucket=self.bucket, Key=name, Body=_as_bytes(data), **extra, **match, **checksum))
        else:
            await self._run(f"PUT {name!r}", lambda s3: self._multipart(s3, name, data, extra, match, checked))
        self._probe.seen()

    async def _multipart(self, s3, name: str, data: memoryview, extra: dict, match: dict, checksum: bool) -> None:
        """A multipart upload whose every part carries its CRC32C, so the server checks each (COMPOSITE)."""
        algorithm = {"ChecksumAlgorithm": "CRC32C"} if checksum else {}
        upload = await s3.create_multipart_upload(Bucket=self.bucket, Key=name, **extra, **algorithm)
        upload_id, size = upload["UploadId"], self.config.part_size
        gate = asyncio.Semaphore(4)

        async def part(number: int, start: int) -> dict:
            body = bytes(data[start:start + size])
            sums = {"ChecksumCRC32C": crc32c_b64_of(body)} if checksum else {}
            async with gate:
                out = await s3.upload_part(Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number,
                                           Body=body, **sums)
            return {"PartNumber": number, "ETag": out["ETag"], **sums}

        try:
            parts = await asyncio.gather(*(part(i + 1, start) for i, start in enumerate(range(0, len(data), size))))
            await s3.complete_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id,
                                               MultipartUpload={"Parts": list(parts)}, **match)
        except BaseException:
            # Also on a cancel: the abort runs as a task of its own, so the parts are not left to bill.
            asyncio.ensure_future(_quietly(s3.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)))
            raise

    async def aget_into(self, name: str, buffer: memoryview, on_chunk: OnChunk | None = None) -> ReadResult | None:
        lease = call.lease()  # taken here: the copies run on s3fs's loop

        async def read(s3) -> ReadResult | None:
            try:
                response = await s3.get_object(Bucket=self.bucket, Key=name)
            except Exception as exc:
                if self._is_miss(exc):
                    return None
                raise
            body = response["Body"]
            try:
                size = response["ContentLength"]
                if size > len(buffer):
                    raise BufferTooSmall(name, size, len(buffer))
                done = 0
                while done < size:
                    # Into bytes of our own first: a cancelled call must never wait on the
                    # network while it holds the caller's buffer.
                    chunk = await body.read(min(PIECE, size - done))
                    if not chunk:
                        raise IntegrityError(f"{name!r}: {done} of {size} bytes arrived")
                    done = call.land_piece(lease, buffer, done, chunk, on_chunk)
            finally:
                body.close()
            return ReadResult(size, dict(response.get("Metadata") or {}))

        result = await self._run(f"GET {name!r}", read)
        if result is None:
            await self._confirm_bucket(name)
        else:
            self._probe.seen()
        return result

    async def ahead(self, name: str) -> ObjectInfo | None:
        async def head(s3) -> ObjectInfo | None:
            try:
                out = await s3.head_object(Bucket=self.bucket, Key=name)
            except Exception as exc:
                if self._is_miss(exc):
                    return None
                raise
            modified = out.get("LastModified")
            return ObjectInfo(name, out["ContentLength"], dict(out.get("Metadata") or {}),
                              modified.timestamp() if modified else None, out.get("ETag"))

        info = await self._run(f"HEAD {name!r}", head)
        if info is None:
            await self._confirm_bucket(name)
        else:
            self._probe.seen()
        return info

    async def _send_delete(self, names: list[str]) -> None:
        async def delete(s3) -> None:
            if len(names) == 1:
                await s3.delete_object(Bucket=self.bucket, Key=names[0])
                return
            for i in range(0, len(names), _DELETE_BATCH):
                batch = [{"Key": n} for n in names[i:i + _DELETE_BATCH]]
                out = await s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                if out.get("Errors"):
                    first = out["Errors"][0]
                    raise StoreUnavailable(f"DELETE {first.get('Key')!r}: {first.get('Code')}", retryable=False)

        await self._run(f"DELETE {names[0]!r}" if len(names) == 1 else f"DELETE {len(names)} objects", delete)

    async def _present(self, names: list[str]) -> list[bool]:
        """Whether each name exists: HEADs, many at once, in one bounded call."""
        async def every(s3) -> list[bool]:
            gate = asyncio.Semaphore(_HEAD_CONCURRENCY)

            async def one(name: str) -> bool:
                async with gate:
                    try:
                        await s3.head_object(Bucket=self.bucket, Key=name)
                    except Exception as exc:
                        if self._is_miss(exc):
                            return False
                        raise
                    return True

            return list(await asyncio.gather(*(one(n) for n in names)))

        found = await self._run(f"HEAD {len(names)} objects", every)
        if all(found):
            self._probe.seen()
        else:
            await self._confirm_bucket(names[found.index(False)])
        return found

    async def alist_pages(self, prefix: str, start_after: str | None = None) -> AsyncIterator[list[ObjectInfo]]:
        token: str | None = None
        seen: set[str] = set()
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                args["ContinuationToken"] = token
            elif start_after is not None:
                args["StartAfter"] = start_after

            async def page(s3, args=args):
                return await s3.list_objects_v2(**args)

            answer = await self._run(f"LIST {prefix!r}", page)
            self._probe.seen()
            out = []
            for item in answer.get("Contents") or ():
                modified = item.get("LastModified")
                out.append(ObjectInfo(item["Key"], int(item.get("Size") or 0), {},
                                      modified.timestamp() if modified else None, item.get("ETag")))
            yield out
            next_token = answer.get("NextContinuationToken") if answer.get("IsTruncated") else None
            if not next_token:
                return
            if next_token in seen:  # a server that hands the same page out again would never end
                raise StoreUnavailable(f"list {prefix!r}: the server repeated a continuation token", retryable=False)
            seen.add(next_token)
            token = next_token


def _close_client(fs) -> None:
    """Close ``fs``'s aiobotocore client on s3fs's loop, waiting ``_CLOSE_TIMEOUT_S`` at most.

    As s3fs's own ``close_session`` does (``__aexit__`` of what ``set_session`` entered), under
    s3fs's session lock, so a session being set up meanwhile is closed too, not left behind.
    Closing twice is harmless: aiobotocore's exit is idempotent (s3fs's finalizer repeats it at GC).
    """
    loop: asyncio.AbstractEventLoop = fs.loop
    if loop.is_closed() or not loop.is_running():
        return  # nothing runs on the loop any more: its sockets go with the process

    async def shut() -> None:
        async with getattr(fs, "_set_session_lock", None) or contextlib.nullcontext():
            creator = getattr(fs, "_s3creator", None)
            if creator is not None:  # None: no request was ever made
                await creator.__aexit__(None, None, None)

    running = asyncio_running_loop()
    if running is not None and running is loop:  # called on s3fs's loop itself: waiting here would stop it
        running.create_task(_quietly(shut()))
        return
    future = asyncio.run_coroutine_threadsafe(shut(), loop)
    try:
        future.result(_CLOSE_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        future.cancel()
        log.debug("the s3fs client did not close within %.1f s", _CLOSE_TIMEOUT_S)
    except Exception as exc:  # closing is best effort: the store is closed either way
        log.debug("closing the s3fs client failed: %r", exc)


async def _quietly(coro) -> None:
    try:
        await coro
    except Exception:
        pass


def _as_bytes(data: memoryview) -> bytes | bytearray:
    """botocore takes bytes, not views: reuse the object under the view when it is whole, else copy once."""
    whole = data.obj
    if isinstance(whole, (bytes, bytearray)) and len(whole) == data.nbytes:
        return whole
    return bytes(data)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _is_connection(exc: BaseException | None) -> bool:
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
        raise BackendUnavailable("fsspec", "s3fs", "pip install s3fs") from None
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
            # One connection per request KVStore lets in flight (botocore's default is 10): asyncio
            # callers put them all on this one loop, and queued behind 10 sockets they would wait
            # out their deadlines there.
            "max_pool_connections": max(config.max_inflight, 10),
            # The CRC32C is sent explicitly (x-amz-checksum-crc32c) from the one the integrity
            # layer already computed; botocore would compute a second one.
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
