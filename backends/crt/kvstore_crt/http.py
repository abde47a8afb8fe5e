"""S3 wire details for the awscrt backend: request paths, headers, request bodies, response sinks, error mapping."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import io
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from email.utils import parsedate_to_datetime
from typing import cast
from urllib.parse import quote, urlsplit

from kvstore.backends.base import PIECE, OnChunk, ReadResult
from kvstore.backends.call import BufferLease
from kvstore.backends.s3errors import error_code, from_status
from kvstore.backends.s3xml import delete_failures as delete_failures  # the backend's wire vocabulary, re-exported
from kvstore.backends.s3xml import parse_list_page as parse_list_page
from kvstore.errors import AuthError, BufferTooSmall, IntegrityError, StoreUnavailable

META_PREFIX = "x-amz-meta-"
DELETE_BATCH = 1000  # the most keys one DeleteObjects call takes
# CRT errors that mean the bytes themselves were wrong rather than the connection.
_INTEGRITY_ERRORS = {"AWS_ERROR_S3_RESPONSE_CHECKSUM_MISMATCH", "AWS_ERROR_S3_OBJECT_MODIFIED"}
# Answers the CRT recognises and reports by name, without the status.
_STATUS_OF = {"AWS_ERROR_S3_SLOW_DOWN": 503, "AWS_ERROR_S3_INTERNAL_ERROR": 500}
# How a TLS client sees a plain-HTTP server: it hangs up on the ClientHello, or answers text.
_TLS_SYMPTOMS = {"AWS_IO_SOCKET_CLOSED", "AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE", "AWS_IO_TLS_ERROR_READ_FAILURE",
                 "AWS_ERROR_HTTP_CONNECTION_CLOSED"}
# A ranged GET of an empty object answered in a way the CRT refuses (s3rver, Ceph, SeaweedFS):
# a HEAD tells whether the object really is empty.
EMPTY_RANGE_SYMPTOMS = {"AWS_ERROR_S3_INVALID_CONTENT_RANGE_HEADER", "AWS_ERROR_S3_MISSING_CONTENT_RANGE_HEADER"}


def encode_path(name: str) -> str:
    """An object name as an RFC 3986 path: unreserved characters and '/' stay, the rest is %XX of UTF-8."""
    return quote(name, safe="/")


def encode_query(params: Sequence[tuple[str, str | None]]) -> str:
    """A query string with every value percent-encoded (S3 signs the encoded form)."""
    return "&".join(k if v is None else f"{k}={quote(v, safe='')}" for k, v in params)


def header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of header ``name`` (case-insensitive)."""
    name = name.lower()
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def user_metadata(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The x-amz-meta-* headers, prefix removed, names lowercased."""
    return {k.lower()[len(META_PREFIX):]: v for k, v in headers if k.lower().startswith(META_PREFIX)}


def object_size(headers: Iterable[tuple[str, str]]) -> int | None:
    """The whole object's size: the total of Content-Range when present, else Content-Length."""
    content_range = header(headers, "content-range")
    if content_range and "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = header(headers, "content-length")
    return int(length) if length is not None else None


def http_date(value: str | None) -> float | None:
    """An RFC 7231 date (Last-Modified) as seconds since the epoch."""
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def delete_body(names: Iterable[str]) -> bytes:
    """The XML body of a DeleteObjects request (quiet: only failures are reported)."""
    root = ET.Element("Delete")
    ET.SubElement(root, "Quiet").text = "true"
    for name in names:
        ET.SubElement(ET.SubElement(root, "Object"), "Key").text = name
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def body_checksum_header(body: bytes, s3express: bool) -> tuple[str, str]:
    """The integrity header DeleteObjects requires: Content-MD5, or CRC32C where S3 Express refuses MD5."""
    if s3express:
        from awscrt.checksums import crc32c

        return "x-amz-checksum-crc32c", base64.b64encode(crc32c(body).to_bytes(4, "big")).decode()
    return "Content-MD5", base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


class ObjectMissing(StoreUnavailable):
    """A 404 that is not NoSuchBucket: a miss for reads once the bucket is known to exist."""

    def __init__(self, message: str, code: str | None) -> None:
        super().__init__(message, retryable=False, status=404)
        self.code = code


def crt_error(exc: BaseException, what: str, endpoint: str = "", *, tls: bool = False) -> BaseException:
    """The kvstore error for what an awscrt request failed with; exceptions raised in our callbacks pass through."""
    from awscrt.exceptions import AwsCrtError
    from awscrt.s3 import S3ResponseError

    if isinstance(exc, S3ResponseError) and exc.status_code:
        body = exc.body
        code = error_code(body) or header(exc.headers or (), "x-amz-error-code")
        if exc.status_code == 412 and what.startswith("get"):
            # The CRT pins later parts to the first part's ETag: the object was replaced mid-read.
            return StoreUnavailable(f"{what}: object changed while being read", status=412)
        if exc.status_code == 404 and code != "NoSuchBucket":
            return ObjectMissing(f"{what}: HTTP 404" + (f" {code}" if code else ""), code)
        return from_status(exc.status_code, code, what)
    if isinstance(exc, AwsCrtError):
        if exc.name in _INTEGRITY_ERRORS:
            return IntegrityError(f"{what}: {exc.name}")
        if exc.name in _STATUS_OF:
            return from_status(_STATUS_OF[exc.name], None, what)
        if exc.name == "AWS_ERROR_S3EXPRESS_CREATE_SESSION_FAILED" and endpoint and _reachable(endpoint):
            # The CRT hides CreateSession's answer; an endpoint that takes connections but grants no
            # session has refused the credentials.
            return AuthError(f"{what}: S3 Express CreateSession was refused (check the keys and bucket access)")
        message = f"{what}: {exc.name}: {exc.message}"
        if tls and exc.name in _TLS_SYMPTOMS and endpoint and speaks_plain_http(endpoint):
            return StoreUnavailable(f"{message}; the endpoint may not speak TLS: use http:// or disable_tls",
                                    retryable=False, connection=True)
        return StoreUnavailable(message, connection=True)
    return exc


def speaks_plain_http(endpoint: str, timeout_s: float = 1.0) -> bool:
    """Whether ``endpoint``'s host and port answer a plain-text HTTP request (asked only after a TLS failure)."""
    parts = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(b"HEAD / HTTP/1.0\r\nHost: " + (parts.hostname or "").encode() + b"\r\n\r\n")
            return sock.recv(5) == b"HTTP/"
    except OSError:
        return False


def _reachable(endpoint: str, timeout_s: float = 1.0) -> bool:
    parts = urlsplit(endpoint)
    try:
        with socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                      timeout=timeout_s):
            return True
    except OSError:
        return False


def iter_batches(names: list[str], size: int = DELETE_BATCH) -> Iterator[list[str]]:
    for start in range(0, len(names), size):
        yield names[start:start + size]



# -- request bodies and response sinks ---------------------------------------------------------------
class Abandoned(Exception):
    """Raised inside a callback of a request its caller has given up on, so the CRT stops it."""


class ViewReader(io.RawIOBase):
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
            raise Abandoned("request abandoned")
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


class Sink:
    """Receives a GET_OBJECT: sizes or checks the target from the headers, then copies each part to its offset.

    With no buffer given, an object that arrives as one part is kept as the ``bytes`` the CRT
    handed over (no copy at all); otherwise a buffer of the advertised size is allocated when
    the first part arrives. A caller's buffer is written only under its ``lease`` (the CRT's
    threads run on after a cancel), and writes stop once the request is abandoned.
    """

    def __init__(self, name: str, buffer: memoryview | None, on_chunk: OnChunk | None = None,
                 lease: BufferLease | None = None) -> None:
        self.name = name
        self.buffer = buffer
        self.on_chunk = on_chunk
        self.lease = lease if buffer is not None else None  # a buffer of our own needs none
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
                raise Abandoned("request abandoned")
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
            if self._address:
                self._land_in_pieces(chunk, offset)
            else:
                with self._writing():
                    self.buffer[offset:end] = chunk
            self.received += len(chunk)

    def _writing(self):
        return self.lease.writing() if self.lease is not None else contextlib.nullcontext()

    def _land_in_pieces(self, chunk: bytes, offset: int) -> None:
        """Copy a part PIECE bytes at a time (each under the lease, so a revoke waits one piece at most),
        handing each piece on while it is still in cache."""
        source = cast(int, ctypes.cast(ctypes.c_char_p(chunk), ctypes.c_void_p).value)  # the part's own bytes, no copy
        buffer = cast(memoryview, self.buffer)  # _address is set only with a buffer
        for start in range(0, len(chunk), PIECE):
            n = min(PIECE, len(chunk) - start)
            with self._writing():
                ctypes.memmove(self._address + offset + start, source + start, n)  # releases the GIL
                if self.on_chunk:
                    self.on_chunk(offset + start, buffer[offset + start:offset + start + n])

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


class Collect:
    """Headers and the (small) body of a plain request."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.abandoned = threading.Event()
        self.lease = None

    def on_headers(self, status_code: int, headers, **_) -> None:
        self.status = status_code
        self.headers = list(headers)

    def on_body(self, chunk: bytes, offset: int, **_) -> None:
        if self.abandoned.is_set():
            raise Abandoned("request abandoned")
        self.body += chunk

    def abandon(self) -> None:
        self.abandoned.set()
