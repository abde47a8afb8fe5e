"""S3 through awscrt's native client: the default backend of every S3 profile.

One ``S3Client`` per backend. PUT_OBJECT and GET_OBJECT let the CRT split large objects into
parts (multipart upload, parallel ranged GETs); every other call is a plain signed request.
Every operation is a coroutine (``AsyncBackend``): a request awaits the CRT's future on the
caller's event loop, so any number in flight cost no thread of ours, for what is left of the
operation's deadline (``call.remaining``), and is cancelled after that or when the awaiting task
is cancelled; the blocking methods run the same coroutines on the backend's loop thread. Reads land in the caller's buffer one part at
a time, at the part's offset, under the call's buffer lease: no full-size intermediate, and no
write after a cancel, timeout or close has returned. Uploads carry ``x-amz-checksum-crc32c``
(per part for multipart) so that servers that validate refuse damaged bytes. Retries belong to
``RetryLayer``, so the CRT's own are switched off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from urllib.parse import urlsplit

from awscrt import auth as crt_auth
from awscrt import http as crt_http
from awscrt import io as crt_io
from awscrt import s3 as crt_s3

from kvstore.backends import call
from kvstore.backends.base import Capabilities, ObjectInfo, OnChunk, ReadResult, ca_bundle_pem
from kvstore.backends.coroutines import AsyncBackend, future_result
from kvstore.backends.s3delete import HeadThenDelete
from kvstore.backends.s3errors import from_status
from kvstore.errors import BucketNotFound, StoreTimeout, StoreUnavailable
from kvstore_crt.http import (
    EMPTY_RANGE_SYMPTOMS,
    META_PREFIX,
    Abandoned,
    Collect,
    ObjectMissing,
    Sink,
    ViewReader,
    body_checksum_header,
    crt_error,
    delete_body,
    delete_failures,
    encode_path,
    encode_query,
    header,
    http_date,
    iter_batches,
    object_size,
    parse_list_page,
    user_metadata,
)

CANCEL_GRACE_S = 2.0  # how long a cancelled request may take to settle before we stop waiting
SHUTDOWN_WAIT_S = 5.0  # bound on close() waiting for the client's threads to stop
# A HEAD answers a missing bucket and a missing key alike (404, no body); one HeadBucket tells
# them apart, and a bucket seen to exist (any success) is taken as existing for this long.
BUCKET_PROBE_TTL_S = 60.0
# The CRT computes it over the bytes it sends and puts it in a header (per part, and in
# CompleteMultipartUpload): a plain header, which servers that do not validate just ignore.
_UPLOAD_CHECKSUM = crt_s3.S3ChecksumConfig(algorithm=crt_s3.S3ChecksumAlgorithm.CRC32C,
                                          location=crt_s3.S3ChecksumLocation.HEADER)


class _Pending:
    """One request in flight, its deadline, and how to give up on it."""

    __slots__ = ("request", "what", "sink", "deadline", "budget", "__weakref__")

    def __init__(self, request, what: str, sink, budget: float) -> None:
        self.request = request
        self.what = what
        self.sink = sink
        self.budget = budget
        self.deadline = time.monotonic() + budget

    def abandon(self) -> None:
        self.sink.abandon()

    def stop(self) -> None:
        """Abandon and cancel (a lease revoke calls this from another thread: the request may be gone)."""
        self.sink.abandon()
        request = self.request
        if request is not None:
            request.cancel()


def _stopper(pending: _Pending) -> Callable[[], None]:
    """``pending.stop`` without keeping the request (and the caller's buffer) alive in the lease."""
    ref = weakref.ref(pending)

    def stop() -> None:
        found = ref()
        if found is not None:
            found.stop()

    return stop


def default_io_threads() -> int:
    """Event-loop threads when ``s3_num_io_threads`` is 0: one per usable CPU, at least 4, at most 16.

    The CRT's own default is half the processors. Each loop thread waits for the GIL whenever it
    hands a part to Python, and its sockets stall meanwhile, so too few loops leave the CPU idle:
    on 2 vCPUs, 8 MiB reads and writes at 16 in flight ran 10-55% faster with 2 to 8 loops than
    with the CRT's one (docs/benchmarks.md). The cap keeps a container on a large node, which sees
    every CPU of the node, from starting a hundred loops.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(4, min(usable, 16))


class CrtBackend(HeadThenDelete, AsyncBackend):
    capabilities = Capabilities(conditional_put=True)

    def __init__(self, config) -> None:
        super().__init__(config)
        endpoint = config.endpoint
        self._host = urlsplit(endpoint).netloc if "://" in endpoint else endpoint
        self._bucket_path = "" if config.addressing == "virtual" else "/" + encode_path(config.bucket)
        self._lock = threading.Lock()
        self._inflight: set[_Pending] = set()
        self._closed = False
        self._bucket_seen_until = 0.0  # monotonic time until which the bucket is taken to exist
        self._client = self._make_client(config)

    # -- client ------------------------------------------------------------------------------
    @staticmethod
    def _credentials(config, bootstrap) -> crt_auth.AwsCredentialsProvider:
        creds = config.credentials
        if creds.source in ("static", "env"):
            return crt_auth.AwsCredentialsProvider.new_static(
                creds.access_key_id, creds.secret_access_key.reveal(),
                creds.session_token.reveal() if creds.session_token else None)
        if creds.source == "profile":
            return crt_auth.AwsCredentialsProvider.new_profile(bootstrap, profile_name=creds.profile_name)
        return crt_auth.AwsCredentialsProvider.new_default_chain(bootstrap)

    def _make_client(self, config) -> crt_s3.S3Client:
        event_loops = crt_io.EventLoopGroup(config.io_threads or default_io_threads())
        bootstrap = crt_io.ClientBootstrap(event_loops, crt_io.DefaultHostResolver(event_loops))
        signing = crt_s3.create_default_s3_signing_config(
            region=config.region, credential_provider=self._credentials(config, bootstrap))
        if config.s3express:
            signing = signing.replace(algorithm=crt_auth.AwsSigningAlgorithm.V4_S3EXPRESS)
        tls_options = None
        if config.tls:
            context = crt_io.TlsContextOptions()
            ca_pem = ca_bundle_pem(config)
            if ca_pem:
                context.override_default_trust_store(ca_pem)
            if config.prefer_http2:
                context.alpn_list = ["h2", "http/1.1"]
            tls_options = crt_io.ClientTlsContext(context).new_connection_options()
        return crt_s3.S3Client(
            bootstrap=bootstrap,
            region=config.region,
            tls_mode=crt_s3.S3RequestTlsMode.ENABLED if config.tls else crt_s3.S3RequestTlsMode.DISABLED,
            tls_connection_options=tls_options,
            signing_config=signing,
            part_size=config.part_size,
            enable_s3express=config.s3express,
            # Parts of one object still go in parallel; the total stays near what KVStore lets in flight.
            max_active_connections_override=max(config.max_inflight, 4),
            retry_config=crt_s3.S3RetryConfig(retry_mode=crt_s3.S3RetryMode.NONE),
            connect_timeout_ms=max(1, int(config.connect_timeout_s * 1000)),
        )

    # -- requests ----------------------------------------------------------------------------
    def _path(self, name: str | None = None, query: str = "") -> str:
        # Bucket-level calls go to "/bucket" (path style) or "/" (virtual), as S3 documents them.
        path = (self._bucket_path or "/") if name is None else f"{self._bucket_path}/{encode_path(name)}"
        return path + ("?" + query if query else "")

    def _start(self, what: str, method: str, path: str, *, headers: Mapping[str, str] | None = None,
               body: io.RawIOBase | None = None, kind=crt_s3.S3RequestType.DEFAULT, operation: str | None = None,
               sink=None) -> _Pending:
        sink = sink or Collect()
        budget = call.remaining(self.config.timeout_s)
        if budget <= 0:
            raise StoreTimeout(f"{what}: the operation's {self.config.timeout_s:g} s deadline has passed")
        lease = sink.lease
        if lease is not None and lease.revoked:
            raise call.CallAbandoned(f"{what}: the caller gave up before the request started")
        request = crt_http.HttpRequest(method, path, crt_http.HttpHeaders([("Host", self._host), *(headers or {}).items()]),
                                       body)
        with self._lock:
            if self._closed:
                raise StoreUnavailable(f"{what}: the backend is closed", retryable=False)
            s3_request = self._client.make_request(
                type=kind, request=request, operation_name=operation if kind == crt_s3.S3RequestType.DEFAULT else None,
                checksum_config=_UPLOAD_CHECKSUM if kind == crt_s3.S3RequestType.PUT_OBJECT else None,
                on_headers=sink.on_headers, on_body=sink.on_body)
            pending = _Pending(s3_request, what, sink, budget)
            self._inflight.add(pending)
        if lease is not None:
            # The CRT's threads would go on writing after the caller gave up: a revoke stops them.
            lease.on_revoke(_stopper(pending))
        return pending

    async def _wait(self, pending: _Pending) -> None:
        """Await ``pending`` until its deadline; cancel it and raise StoreTimeout after that.

        A cancel of the awaiting task cancels the request (without waiting for it to settle:
        the caller's lease, revoked by the store, keeps its buffer safe) and propagates.
        """
        finished = future_result(pending.request.finished_future)
        try:
            await asyncio.wait_for(finished, timeout=max(0.0, pending.deadline - time.monotonic()))
        except asyncio.TimeoutError as exc:  # not the builtin TimeoutError before 3.11
            await self._give_up(pending)
            raise StoreTimeout(f"{pending.what}: no answer within {pending.budget:.3g} s "
                               f"(timeout_s {self.config.timeout_s:g})") from exc
        except asyncio.CancelledError:
            pending.stop()
            raise
        except call.CallAbandoned:
            raise
        except Abandoned as exc:
            raise StoreUnavailable(f"{pending.what}: the backend was closed", retryable=False) from exc
        except BaseException as exc:
            lease = pending.sink.lease
            if lease is not None and lease.revoked:
                raise call.CallAbandoned(f"{pending.what}: the caller gave up; the request was cancelled") from exc
            mapped = crt_error(exc, pending.what, self.config.endpoint, tls=self.config.tls)
            if self._closed and isinstance(mapped, StoreUnavailable) and mapped.connection:
                raise StoreUnavailable(f"{pending.what}: the backend was closed", retryable=False) from exc
            if mapped is exc:
                raise
            raise mapped from exc
        else:
            # Any answer from inside the bucket shows that it exists.
            self._bucket_seen_until = time.monotonic() + BUCKET_PROBE_TTL_S
        finally:
            with self._lock:
                self._inflight.discard(pending)
            # A traceback that keeps this frame alive must not keep the request (and so the client) alive.
            pending.request = None

    async def _give_up(self, pending: _Pending) -> None:
        pending.abandon()
        request = pending.request
        if request is None:
            return
        request.cancel()
        with contextlib.suppress(BaseException):  # it settles with the cancel's error, or ends anyway
            await asyncio.wait_for(future_result(request.finished_future), CANCEL_GRACE_S)

    async def _call(self, what: str, method: str, path: str, **kwargs) -> Collect:
        pending = self._start(what, method, path, **kwargs)
        await self._wait(pending)
        return pending.sink

    async def _miss(self, what: str, missing: ObjectMissing) -> None:
        """Return (a plain miss) when the bucket exists; raise BucketNotFound when it does not.

        A GET's NoSuchKey already says so; a bare 404 (every HEAD) needs the bucket probed, which
        a recent success makes unnecessary.
        """
        if missing.code == "NoSuchKey" or time.monotonic() < self._bucket_seen_until:
            return
        try:
            await self._call(f"{what}: probing the bucket", "HEAD", self._path(None), operation="HeadBucket")
        except ObjectMissing as exc:
            unlike_s3 = "" if missing.code else f"; the 404 carried no S3 error code: is {self.config.endpoint} an S3 endpoint?"
            raise BucketNotFound(f"{what}: the bucket {self.config.bucket!r} does not exist "
                                 f"(HEAD of the bucket: HTTP 404{unlike_s3})") from exc

    # -- objects -----------------------------------------------------------------------------
    async def aput(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        headers = {"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}
        headers.update({META_PREFIX + k: v for k, v in metadata.items()})
        if if_absent:
            headers["If-None-Match"] = "*"
        sink = Collect()
        body = ViewReader(data, sink.abandoned)
        await self._call(f"put {name!r}", "PUT", self._path(name), headers=headers, body=body,
                         kind=crt_s3.S3RequestType.PUT_OBJECT, sink=sink)

    async def _read(self, name: str, buffer: memoryview | None, on_chunk: OnChunk | None = None) -> Sink | None:
        what = f"get {name!r}"
        sink = Sink(name, buffer, on_chunk, call.lease())
        try:
            await self._call(what, "GET", self._path(name), kind=crt_s3.S3RequestType.GET_OBJECT, sink=sink)
        except ObjectMissing as exc:
            await self._miss(what, exc)
            return None
        except StoreUnavailable as exc:
            quirk = getattr(exc.__cause__, "name", None) in EMPTY_RANGE_SYMPTOMS
            if exc.status != 416 and not quirk:
                raise
            # Servers answer the CRT's ranged GET of an empty object with 416 (Ceph RGW, SeaweedFS),
            # 200, or 206 with an odd or no Content-Range (s3rver): HEAD tells whether it is empty.
            info = await self.ahead(name)
            if info is None:
                return None
            if info.size != 0:
                if quirk:
                    raise StoreUnavailable(f"{what}: the server answered a ranged GET of a {info.size}-byte object "
                                           "without a valid Content-Range", retryable=False) from exc
                raise
            sink.size, sink.metadata = 0, dict(info.metadata)
        return sink

    async def aget_into(self, name: str, buffer: memoryview, on_chunk: OnChunk | None = None) -> ReadResult | None:
        sink = await self._read(name, buffer, on_chunk)
        return None if sink is None else sink.result()

    async def aget(self, name: str) -> tuple[bytes | memoryview, ReadResult] | None:
        sink = await self._read(name, None)
        if sink is None:
            return None
        result = sink.result()
        if sink.whole is not None:
            return sink.whole, result
        return (sink.buffer if sink.buffer is not None else memoryview(b"")), result

    async def ahead(self, name: str) -> ObjectInfo | None:
        return await self._finish_head(name, self._start_head(name))

    def _start_head(self, name: str) -> _Pending:
        return self._start(f"head {name!r}", "HEAD", self._path(name), operation="HeadObject")

    async def _finish_head(self, name: str, pending: _Pending) -> ObjectInfo | None:
        try:
            await self._wait(pending)
        except ObjectMissing as exc:
            await self._miss(pending.what, exc)
            return None
        sink: Collect = pending.sink
        etag = header(sink.headers, "etag")
        return ObjectInfo(name, object_size(sink.headers) or 0, user_metadata(sink.headers),
                          http_date(header(sink.headers, "last-modified")), etag.strip('"') if etag else None)

    async def _send_delete(self, names: list[str]) -> None:
        if len(names) == 1:
            await self._call(f"delete {names[0]!r}", "DELETE", self._path(names[0]), operation="DeleteObject")
            return
        for batch in iter_batches(names):
            body = delete_body(batch)
            key, value = body_checksum_header(body, self.config.s3express)
            answer = await self._call(
                f"delete_many ({len(batch)} objects)", "POST", self._path(None, "delete"),
                headers={"Content-Length": str(len(body)), "Content-Type": "application/xml", key: value},
                body=io.BytesIO(body), operation="DeleteObjects")
            failures = delete_failures(bytes(answer.body))
            if failures:
                name, code = next(iter(failures.items()))
                # The call itself succeeded (HTTP 200); the per-object code decides the error.
                raise from_status(200, code, f"delete_many: {len(failures)} objects not deleted, first {name!r}")

    async def _present(self, names: list[str]) -> list[bool]:
        """Whether each object exists, with up to max_inflight HEADs in flight at once."""
        found: list[bool] = []
        window = max(1, self.config.max_inflight)
        for start in range(0, len(names), window):
            chunk = names[start:start + window]
            pending = [self._start_head(n) for n in chunk]
            try:
                for n, p in zip(chunk, pending):
                    found.append(await self._finish_head(n, p) is not None)
            finally:
                for p in pending:  # an error part-way: settle the rest before leaving
                    if p.request is not None:
                        await self._give_up(p)
                        with self._lock:
                            self._inflight.discard(p)
                        p.request = None
        return found

    async def alist_pages(self, prefix: str, start_after: str | None = None) -> AsyncIterator[list[ObjectInfo]]:
        token: str | None = None
        seen: set[str] = set()
        while True:
            params: list[tuple[str, str | None]] = [("list-type", "2"), ("prefix", prefix)]
            if token:
                params.append(("continuation-token", token))
            elif start_after is not None:
                params.append(("start-after", start_after))
            try:
                answer = await self._call("list", "GET", self._path(None, encode_query(params)), operation="ListObjectsV2")
            except ObjectMissing as exc:
                await self._miss(f"list {prefix!r}", exc)  # BucketNotFound when the bucket is not there
                raise StoreUnavailable(f"list {prefix!r}: ListObjectsV2 answered HTTP 404 in a bucket that exists",
                                       retryable=False) from exc
            entries, token = parse_list_page(bytes(answer.body), f"list {prefix!r}")
            yield [ObjectInfo(name, size, {}, modified, etag) for name, size, modified, etag in entries]
            if not token:
                return
            if token in seen:  # a server that hands the same page out again would never end
                raise StoreUnavailable(f"list {prefix!r}: the server repeated a continuation token", retryable=False)
            seen.add(token)

    def close(self) -> None:
        """Cancel what is in flight (bounded wait), then release the client and its threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = [(p, p.request) for p in self._inflight if p.request is not None]
        _cancel_all(pending)
        del pending
        shutdown = self._client.shutdown_event
        self._client = None
        shutdown.wait(SHUTDOWN_WAIT_S)
        super().close()

def _cancel_all(pending: list) -> None:
    """Cancel every request and wait for them to settle, CANCEL_GRACE_S at most in all.

    It waits without ``result()``: a re-raised stored exception would record this frame, and
    with it the requests, in its traceback, keeping the client from shutting down.
    """
    for p, request in pending:
        p.abandon()
        request.cancel()
    concurrent.futures.wait([request.finished_future for _, request in pending], timeout=CANCEL_GRACE_S)
    # A coroutine still awaiting one of them (its loop may be the very one calling close) would
    # keep the request, and so the client, alive: it finds the request gone when it resumes.
    for p, _ in pending:
        p.request = None
