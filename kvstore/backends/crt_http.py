"""S3 wire details for the awscrt backend: request paths, header reading, XML bodies, error mapping."""

from __future__ import annotations

import base64
import hashlib
import socket
import xml.etree.ElementTree as ET
from email.utils import parsedate_to_datetime
from typing import Iterable, Iterator, Sequence
from urllib.parse import quote, urlsplit

from kvstore.backends.s3errors import error_code, from_status
from kvstore.errors import AuthError, IntegrityError, StoreUnavailable

META_PREFIX = "x-amz-meta-"
DELETE_BATCH = 1000  # the most keys one DeleteObjects call takes
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
# CRT errors that mean the bytes themselves were wrong rather than the connection.
_INTEGRITY_ERRORS = {"AWS_ERROR_S3_RESPONSE_CHECKSUM_MISMATCH", "AWS_ERROR_S3_OBJECT_MODIFIED"}
# Answers the CRT recognises and reports by name, without the status.
_STATUS_OF = {"AWS_ERROR_S3_SLOW_DOWN": 503, "AWS_ERROR_S3_INTERNAL_ERROR": 500}


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


def iso_date(value: str | None) -> float | None:
    """An ISO 8601 date (ListObjectsV2 LastModified) as seconds since the epoch."""
    if not value:
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _text(element: ET.Element, tag: str) -> str | None:
    child = element.find(_NS + tag)
    if child is None:
        child = element.find(tag)
    return child.text if child is not None else None


def _children(element: ET.Element, tag: str) -> list[ET.Element]:
    return element.findall(_NS + tag) or element.findall(tag)


def _parse(body: bytes, what: str) -> ET.Element:
    try:
        return ET.fromstring(body)
    except ET.ParseError as exc:
        raise StoreUnavailable(f"{what}: unreadable XML answer ({exc})") from None


def parse_list_page(body: bytes) -> tuple[list[tuple[str, int, float | None, str | None]], str | None]:
    """(name, size, last_modified, etag) of each object in a ListObjectsV2 page, and the next continuation token."""
    root = _parse(body, "list")
    entries = []
    for item in _children(root, "Contents"):
        etag = _text(item, "ETag")
        entries.append((_text(item, "Key") or "", int(_text(item, "Size") or 0), iso_date(_text(item, "LastModified")),
                        etag.strip('"') if etag else None))
    truncated = (_text(root, "IsTruncated") or "false").lower() == "true"
    return entries, (_text(root, "NextContinuationToken") if truncated else None)


def delete_body(names: Iterable[str]) -> bytes:
    """The XML body of a DeleteObjects request (quiet: only failures are reported)."""
    root = ET.Element("Delete")
    ET.SubElement(root, "Quiet").text = "true"
    for name in names:
        ET.SubElement(ET.SubElement(root, "Object"), "Key").text = name
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def delete_failures(body: bytes) -> dict[str, str]:
    """name -> error code for each object a DeleteObjects answer says it could not delete."""
    root = _parse(body, "delete_many")
    return {(_text(e, "Key") or ""): (_text(e, "Code") or "Error") for e in _children(root, "Error")}


def body_checksum_header(body: bytes, s3express: bool) -> tuple[str, str]:
    """The integrity header DeleteObjects requires: Content-MD5, or CRC32C where S3 Express refuses MD5."""
    if s3express:
        from awscrt.checksums import crc32c

        return "x-amz-checksum-crc32c", base64.b64encode(crc32c(body).to_bytes(4, "big")).decode()
    return "Content-MD5", base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


def crt_error(exc: BaseException, what: str, endpoint: str = "") -> BaseException:
    """The kvstore error for what an awscrt request failed with; exceptions raised in our callbacks pass through."""
    from awscrt.exceptions import AwsCrtError
    from awscrt.s3 import S3ResponseError

    if isinstance(exc, S3ResponseError) and exc.status_code:
        body = exc.body
        code = error_code(body) or header(exc.headers or (), "x-amz-error-code")
        if exc.status_code == 412 and what.startswith("get"):
            # The CRT pins later parts to the first part's ETag: the object was replaced mid-read.
            return StoreUnavailable(f"{what}: object changed while being read", status=412)
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
        return StoreUnavailable(f"{what}: {exc.name}: {exc.message}", connection=True)
    return exc


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

