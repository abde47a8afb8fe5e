"""S3 XML answers read by local element names, whatever namespace URI (or none) and element order a server uses.

AWS puts everything in ``http://s3.amazonaws.com/doc/2006-03-01/``; s3rver and others use another
URI or none, and a reader that looks for AWS's exact URI finds nothing, which a listing turns
into a quietly empty answer. Pages that cannot be read, or that lack what is needed to go on,
raise ``StoreUnavailable`` (not retryable: the same server answers the same way again).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import datetime
from typing import NamedTuple

from kvstore.errors import StoreUnavailable


class ListEntry(NamedTuple):
    name: str
    size: int
    last_modified: float | None
    etag: str | None


class ListPage(NamedTuple):
    entries: list[ListEntry]
    next_token: str | None  # None: this was the last page


def local(tag: str) -> str:
    """``{uri}Name`` or ``prefix:Name`` -> ``Name``."""
    return tag.rsplit("}", 1)[-1].rsplit(":", 1)[-1]


def children(element: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in element if local(child.tag) == name]


def child(element: ET.Element, name: str) -> ET.Element | None:
    for c in element:
        if local(c.tag) == name:
            return c
    return None


def text(element: ET.Element, name: str) -> str | None:
    found = child(element, name)
    return None if found is None else (found.text or "")


def parse(body: bytes, what: str, root: str | None = None) -> ET.Element:
    """The document's root element; ``root`` names the element it must be."""
    try:
        element = ET.fromstring(body)
    except ET.ParseError as exc:
        raise StoreUnavailable(f"{what}: unreadable XML answer ({exc}): {_excerpt(body)}", retryable=False) from exc
    if root is not None and local(element.tag) != root:
        raise StoreUnavailable(f"{what}: expected <{root}>, the server answered <{local(element.tag)}>: "
                               f"{_excerpt(body)}", retryable=False)
    return element


def error_code(body: bytes) -> str | None:
    """The <Code> of an <Error> document; None when the body is not one."""
    try:
        element = ET.fromstring(body)
    except ET.ParseError:
        return None
    if local(element.tag) != "Error":
        return None
    return text(element, "Code") or None


def iso_date(value: str | None) -> float | None:
    """An ISO 8601 date (ListObjectsV2 LastModified) as seconds since the epoch."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def parse_list_page(body: bytes, what: str = "list") -> ListPage:
    """One ListObjectsV2 page; an entry without a key or size, or a page that cannot go on, is an error."""
    root = parse(body, what, "ListBucketResult")
    entries = []
    for item in children(root, "Contents"):
        name, size = text(item, "Key"), text(item, "Size")
        if not name or size is None or not size.strip().isdigit():
            raise StoreUnavailable(f"{what}: a listed object lacks a key or size: {_excerpt(ET.tostring(item))}",
                                   retryable=False)
        etag = text(item, "ETag")
        modified = iso_date(text(item, "LastModified"))
        entries.append(ListEntry(name, int(size), modified, etag.strip('"') if etag else None))
    truncated = (text(root, "IsTruncated") or "").strip().lower()
    if truncated not in ("true", "false"):
        raise StoreUnavailable(f"{what}: the page does not say whether more follow (IsTruncated "
                               f"{truncated or 'missing'})", retryable=False)
    if truncated == "false":
        return ListPage(entries, None)
    token = (text(root, "NextContinuationToken") or "").strip()
    if not token:
        raise StoreUnavailable(f"{what}: the page is truncated but carries no NextContinuationToken", retryable=False)
    return ListPage(entries, token)


def delete_failures(body: bytes, what: str = "delete_many") -> dict[str, str]:
    """name -> error code for each object a DeleteObjects answer says it could not delete."""
    root = parse(body, what, "DeleteResult")
    return {(text(e, "Key") or ""): (text(e, "Code") or "Error") for e in children(root, "Error")}


def _excerpt(body: bytes, limit: int = 200) -> str:
    shown = body[:limit].decode("utf-8", "replace")
    return repr(shown + ("..." if len(body) > limit else ""))
