"""Pieces the S3 backends share: the bucket probe and upload checksums.

* ``BucketProbe``: a HEAD 404 has no body, so it cannot tell a missing key from a missing bucket.
  One probe per store settles it; any request that reached the bucket proves it too, and a
  ``NoSuchBucket`` answer forgets it again. A miss then costs no second request.
* ``crc32c_b64``: the CRC32C the integrity layer put in the metadata, the way S3 wants it in
  ``x-amz-checksum-crc32c``, so that a server that validates refuses a body damaged on the way.
"""

from __future__ import annotations

import asyncio
import base64
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kvstore.errors import BucketNotFound, StoreUnavailable
from kvstore.layers.integrity import CRC_KEY, crc32c


class BucketProbe:
    """Whether this store's bucket is known to exist, settled by at most one probe at a time."""

    def __init__(self) -> None:
        self._seen = False
        # An asyncio lock belongs to one loop, and a store is used from several (its blocking
        # mirror's, LMCache's): one lock per loop keeps each loop's concurrent misses to one probe.
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

    def seen(self) -> None:
        """A request reached the bucket: it exists."""
        self._seen = True

    def forget(self) -> None:
        """The server said ``NoSuchBucket``: probe again next time (it may be created meanwhile)."""
        self._seen = False

    async def confirm(self, probe: Callable[[], Awaitable[object]]) -> None:
        """After a bare 404: return when the bucket exists; ``probe`` raises (``BucketNotFound``, ...) otherwise."""
        if self._seen:
            return
        lock = self._locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
        async with lock:
            if not self._seen:
                try:
                    await probe()
                except StoreUnavailable as exc:
                    if exc.status != 404:
                        raise
                    # A listing of the bucket answered 404 with no NoSuchBucket: no bucket there,
                    # and most likely no S3 server either.
                    raise BucketNotFound(f"{exc}: the bucket does not answer, and the 404 carried no S3 error "
                                         "code: is the endpoint an S3 endpoint?") from exc
                self._seen = True


def crc32c_b64(metadata: Mapping[str, str]) -> str | None:
    """``x-amz-checksum-crc32c`` (base64 of the 4 big-endian bytes) for the CRC32C in ``metadata``, if any."""
    value = metadata.get(CRC_KEY)
    if value is None:
        return None
    return base64.b64encode(int(value, 16).to_bytes(4, "big")).decode("ascii")


def crc32c_b64_of(data: Any) -> str:
    """``x-amz-checksum-crc32c`` of ``data`` (one part of a multipart upload)."""
    return base64.b64encode(crc32c(data).to_bytes(4, "big")).decode("ascii")
