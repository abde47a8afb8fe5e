"""End-to-end integrity: a CRC32C stored as object metadata on put, checked on every read.

The checksum rides in metadata (``x-amz-meta-kvstore-crc32c`` on S3), so the object's bytes
stay exactly what LMCache writes; objects without one (written by LMCache itself) get the size
check the backends always do.
"""

from __future__ import annotations

from typing import Mapping

from kvstore.backends.base import ReadResult
from kvstore.errors import BackendUnavailable, IntegrityError
from kvstore.layers.base import Layer

CRC_KEY = "kvstore-crc32c"


def crc32c(data) -> int:
    try:
        from awscrt import checksums
    except ImportError:
        raise BackendUnavailable("crc32c checksum", "awscrt", "crt") from None
    return checksums.crc32c(data)


class IntegrityLayer(Layer):
    def put(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        if self.config.checksum == "crc32c":
            metadata = {**metadata, CRC_KEY: f"{crc32c(data):08x}"}
        self.inner.put(name, data, metadata, if_absent=if_absent)

    def get_into(self, name: str, buffer: memoryview) -> ReadResult | None:
        result = self.inner.get_into(name, buffer)
        if result is not None:
            self._check(name, buffer[: result.size], result)
        return result

    def get(self, name: str):
        found = self.inner.get(name)
        if found is not None:
            self._check(name, found[0], found[1])
        return found

    @staticmethod
    def _check(name: str, data, result: ReadResult) -> None:
        if len(data) != result.size:
            raise IntegrityError(f"{name!r}: read {len(data)} bytes of {result.size}")
        stored = result.metadata.get(CRC_KEY)
        if stored is None:
            return
        actual = f"{crc32c(data):08x}"
        if actual != stored.lower():
            raise IntegrityError(f"{name!r}: CRC32C {actual} does not match the stored {stored}")
