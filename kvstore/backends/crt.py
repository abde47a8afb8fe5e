"""S3 through awscrt's native client: the default backend of every S3 profile.

One ``S3Client`` per backend. PUT_OBJECT and GET_OBJECT let the CRT split large objects into
parts (multipart upload, parallel ranged GETs); every other call is a plain signed request.
Each blocking call waits on the request's future for at most ``timeout_s`` and cancels it
after that. Reads land in the caller's buffer one part at a time, at the part's offset: no
full-size intermediate. Retries belong to ``RetryLayer``, so the CRT's own are switched off.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import io
import os
import threading
import time
from typing import Iterator, Mapping
from urllib.parse import urlsplit

from awscrt import auth as crt_auth
from awscrt import http as crt_http
from awscrt import io as crt_io
from awscrt import s3 as crt_s3

from kvstore.backends.base import PIECE, Backend, Capabilities, ObjectInfo, OnChunk, ReadResult, ca_bundle_pem
from kvstore.backends.crt_http import (
    META_PREFIX, body_checksum_header, crt_error, delete_body, delete_failures, encode_path, encode_query, header,
    http_date, iter_batches, object_size, parse_list_page, user_metadata,
)
from kvstore.backends.s3errors import from_status
from kvstore.errors import BufferTooSmall, IntegrityError, StoreTimeout, StoreUnavailable

CANCEL_GRACE_S = 2.0  # how long a cancelled request may take to settle before we stop waiting
SHUTDOWN_WAIT_S = 5.0  # bound on close() waiting for the client's threads to stop


class _Abandoned(Exception):
    """Raised inside a callback of a request its caller has given up on, so the CRT stops it."""


class _ViewReader(io.RawIOBase):
    """A seekable stream over the caller's memoryview: the CRT copies from it straight into its part buffers."""

    def __init__(self, view: memoryview, abandoned: threading.Event) -> None:
        super().__init__()
        self._view = view
        self._pos = 0
        self._abandoned = abandoned

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        if self._abandoned.is_set():
            raise _Abandoned("request abandoned")
        n = min(len(target), len(self._view) - self._pos)
        target[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, min(len(self._view), base + offset))
        return self._pos

    def tell(self) -> int:
        return self._pos


class _Sink:
    """Receives a GET_OBJECT: sizes or checks the target from the headers, then copies each part to its offset.

    With no buffer given, an object that arrives as one part is kept as the ``bytes`` the CRT
    handed over (no copy at all); otherwise a buffer of the advertised size is allocated when
    the first part arrives. Writes stop (and the request
    fails) once the caller has given up, so a late part never lands in a buffer it owns again.
    """

    def __init__(self, name: str, buffer: memoryview | None, on_chunk: OnChunk | None = None) -> None:
        self.name = name
        self.buffer = buffer
        self.on_chunk = on_chunk
        self._address = _address_of(buffer) if buffer is not None else 0
        self.size: int | None = None
        self.metadata: dict[str, str] = {}
        self.received = 0
        self.whole: bytes | None = None  # the one part that is the whole object, when no buffer was given
        self.abandoned = threading.Event()
        self._lock = threading.Lock()

    def on_headers(self, status_code: int, headers, **_) -> None:
        if status_code >= 300:
            return  # an error answer: the request's future carries it
        size = object_size(headers)
        self.metadata = user_metadata(headers)
        if size is None:
            return
        self.size = size
        if self.buffer is not None and size > len(self.buffer):
            raise BufferTooSmall(self.name, size, len(self.buffer))

    def on_body(self, chunk: bytes, offset: int, **_) -> None:
        end = offset + len(chunk)
        with self._lock:
            if self.abandoned.is_set():
                raise _Abandoned("request abandoned")
            if self.buffer is None:
                if self.size is None:
                    raise StoreUnavailable(f"get {self.name!r}: the answer did not say the object's size")
                if offset == 0 and len(chunk) == self.size and self.whole is None:
                    self.whole = chunk
                    self.received += len(chunk)
                    return
                self.buffer = memoryview(bytearray(self.size))
                self._address = _address_of(self.buffer)
            if end > len(self.buffer):
                raise BufferTooSmall(self.name, end, len(self.buffer))
            if self.on_chunk and self._address:
                self._land_in_pieces(chunk, offset)
            elif self._address:
                ctypes.memmove(self._address + offset, chunk, len(chunk))  # releases the GIL while copying
            else:
                self.buffer[offset:end] = chunk
            self.received += len(chunk)

    def _land_in_pieces(self, chunk: bytes, offset: int) -> None:
        """Copy a part PIECE bytes at a time, handing each piece on while it is still in cache."""
        source = ctypes.cast(ctypes.c_char_p(chunk), ctypes.c_void_p).value  # the part's own bytes, no copy
        for start in range(0, len(chunk), PIECE):
            n = min(PIECE, len(chunk) - start)
            ctypes.memmove(self._address + offset + start, source + start, n)
            self.on_chunk(offset + start, self.buffer[offset + start:offset + start + n])

    def abandon(self) -> None:
        with self._lock:
            self.abandoned.set()

    def result(self) -> ReadResult:
        size = self.received if self.size is None else self.size
        if self.received != size:
            raise IntegrityError(f"{self.name!r}: {self.received} of {size} bytes arrived")
        return ReadResult(size, self.metadata)


def _address_of(view: memoryview) -> int:
    if len(view) == 0 or view.readonly:
        return 0
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class _Collect:
    """Headers and the (small) body of a plain request."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.abandoned = threading.Event()

    def on_headers(self, status_code: int, headers, **_) -> None:
        self.status = status_code
        self.headers = list(headers)

    def on_body(self, chunk: bytes, offset: int, **_) -> None:
        if self.abandoned.is_set():
            raise _Abandoned("request abandoned")
        self.body += chunk

    def abandon(self) -> None:
        self.abandoned.set()


class _Pending:
    """One request in flight and how to give up on it."""

    __slots__ = ("request", "what", "sink", "started")

    def __init__(self, request, what: str, sink) -> None:
        self.request = request
        self.what = what
        self.sink = sink
        self.started = time.monotonic()

    def abandon(self) -> None:
        self.sink.abandon()


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


class CrtBackend(Backend):
    capabilities = Capabilities(conditional_put=True)

    def __init__(self, config) -> None:
        super().__init__(config)
        endpoint = config.endpoint
        self._host = urlsplit(endpoint).netloc if "://" in endpoint else endpoint
        self._bucket_path = "" if config.addressing == "virtual" else "/" + encode_path(config.bucket)
        self._lock = threading.Lock()
        self._inflight: set[_Pending] = set()
        self._closed = False
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
        sink = sink or _Collect()
        request = crt_http.HttpRequest(method, path, crt_http.HttpHeaders([("Host", self._host), *(headers or {}).items()]),
                                       body)
        with self._lock:
            if self._closed:
                raise StoreUnavailable(f"{what}: the backend is closed", retryable=False)
            s3_request = self._client.make_request(
                type=kind, request=request, operation_name=operation if kind == crt_s3.S3RequestType.DEFAULT else None,
                on_headers=sink.on_headers, on_body=sink.on_body)
            pending = _Pending(s3_request, what, sink)
            self._inflight.add(pending)
        return pending

    def _wait(self, pending: _Pending) -> None:
        """Wait for ``pending`` within timeout_s of its start; cancel it and raise StoreTimeout after that."""
        remaining = self.config.timeout_s - (time.monotonic() - pending.started)
        try:
            pending.request.finished_future.result(timeout=max(0.0, remaining))
        except concurrent.futures.TimeoutError:
            self._give_up(pending)
            raise StoreTimeout(f"{pending.what}: no answer within {self.config.timeout_s:g} s") from None
        except _Abandoned:
            raise StoreUnavailable(f"{pending.what}: the backend was closed", retryable=False) from None
        except BaseException as exc:
            mapped = crt_error(exc, pending.what, self.config.endpoint)
            if self._closed and isinstance(mapped, StoreUnavailable) and mapped.connection:
                raise StoreUnavailable(f"{pending.what}: the backend was closed", retryable=False) from None
            if mapped is exc:
                raise
            raise mapped from None
        finally:
            with self._lock:
                self._inflight.discard(pending)
            # A traceback that keeps this frame alive must not keep the request (and so the client) alive.
            pending.request = None

    def _give_up(self, pending: _Pending) -> None:
        pending.abandon()
        pending.request.cancel()
        concurrent.futures.wait([pending.request.finished_future], timeout=CANCEL_GRACE_S)

    def _call(self, what: str, method: str, path: str, **kwargs) -> _Collect:
        pending = self._start(what, method, path, **kwargs)
        self._wait(pending)
        return pending.sink

    # -- objects -----------------------------------------------------------------------------
    def put(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        headers = {"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}
        headers.update({META_PREFIX + k: v for k, v in metadata.items()})
        if if_absent:
            headers["If-None-Match"] = "*"
        sink = _Collect()
        body = _ViewReader(data, sink.abandoned)
        self._call(f"put {name!r}", "PUT", self._path(name), headers=headers, body=body,
                   kind=crt_s3.S3RequestType.PUT_OBJECT, sink=sink)

    def _read(self, name: str, buffer: memoryview | None, on_chunk: OnChunk | None = None) -> _Sink | None:
        sink = _Sink(name, buffer, on_chunk)
        try:
            self._call(f"get {name!r}", "GET", self._path(name), kind=crt_s3.S3RequestType.GET_OBJECT, sink=sink)
        except StoreUnavailable as exc:
            if exc.status == 404:  # NoSuchKey; NoSuchBucket became BucketNotFound
                return None
            if exc.status != 416:
                raise
            # Ceph RGW and SeaweedFS refuse the CRT's ranged GET of an empty object: HEAD tells.
            info = self.head(name)
            if info is None:
                return None
            if info.size != 0:
                raise
            sink.size, sink.metadata = 0, dict(info.metadata)
        return sink

    def get_into(self, name: str, buffer: memoryview, on_chunk: OnChunk | None = None) -> ReadResult | None:
        sink = self._read(name, buffer, on_chunk)
        return None if sink is None else sink.result()

    def get(self, name: str) -> tuple[memoryview, ReadResult] | None:
        sink = self._read(name, None)
        if sink is None:
            return None
        result = sink.result()
        if sink.whole is not None:
            return sink.whole, result
        return (sink.buffer if sink.buffer is not None else memoryview(b"")), result

    def head(self, name: str) -> ObjectInfo | None:
        return self._finish_head(name, self._start_head(name))

    def _start_head(self, name: str) -> _Pending:
        return self._start(f"head {name!r}", "HEAD", self._path(name), operation="HeadObject")

    def _finish_head(self, name: str, pending: _Pending) -> ObjectInfo | None:
        try:
            self._wait(pending)
        except StoreUnavailable as exc:
            if exc.status == 404:  # HEAD answers carry no body, so a missing bucket reads as a miss too
                return None
            raise
        sink: _Collect = pending.sink
        etag = header(sink.headers, "etag")
        return ObjectInfo(name, object_size(sink.headers) or 0, user_metadata(sink.headers),
                          http_date(header(sink.headers, "last-modified")), etag.strip('"') if etag else None)

    def delete(self, name: str) -> bool:
        # S3 answers DELETE with 204 whether or not the object existed: HEAD first to tell the caller.
        existed = self.head(name) is not None
        if existed:
            self._call(f"delete {name!r}", "DELETE", self._path(name), operation="DeleteObject")
        return existed

    def delete_many(self, names: list[str]) -> list[bool]:
        existed = self._head_all(names)
        present = [n for n, e in zip(names, existed) if e]
        for batch in iter_batches(present):
            body = delete_body(batch)
            key, value = body_checksum_header(body, self.config.s3express)
            answer = self._call(
                f"delete_many ({len(batch)} objects)", "POST", self._path(None, "delete"),
                headers={"Content-Length": str(len(body)), "Content-Type": "application/xml", key: value},
                body=io.BytesIO(body), operation="DeleteObjects")
            failures = delete_failures(bytes(answer.body))
            if failures:
                name, code = next(iter(failures.items()))
                # The call itself succeeded (HTTP 200); the per-object code decides the error.
                raise from_status(200, code, f"delete_many: {len(failures)} objects not deleted, first {name!r}")
        return existed

    def _head_all(self, names: list[str]) -> list[bool]:
        """Whether each object exists, with up to max_inflight HEADs in flight at once."""
        found: list[bool] = []
        window = max(1, self.config.max_inflight)
        for start in range(0, len(names), window):
            chunk = names[start:start + window]
            pending = [self._start_head(n) for n in chunk]
            try:
                found.extend(self._finish_head(n, p) is not None for n, p in zip(chunk, pending))
            finally:
                for p in pending:  # an error part-way: settle the rest before leaving
                    if p.request is not None:
                        self._give_up(p)
                        with self._lock:
                            self._inflight.discard(p)
                        p.request = None
        return found

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        token: str | None = None
        while True:
            params: list[tuple[str, str | None]] = [("list-type", "2"), ("prefix", prefix)]
            if token:
                params.append(("continuation-token", token))
            answer = self._call("list", "GET", self._path(None, encode_query(params)), operation="ListObjectsV2")
            entries, token = parse_list_page(bytes(answer.body))
            for name, size, modified, etag in entries:
                yield ObjectInfo(name, size, {}, modified, etag)
            if not token:
                return

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


def _cancel_all(pending: list) -> None:
    """Cancel every request and wait for them to settle, CANCEL_GRACE_S at most in all.

    It waits without ``result()``: a re-raised stored exception would record this frame, and
    with it the requests, in its traceback, keeping the client from shutting down.
    """
    for p, request in pending:
        p.abandon()
        request.cancel()
    concurrent.futures.wait([request.finished_future for _, request in pending], timeout=CANCEL_GRACE_S)
