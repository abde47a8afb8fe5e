"""A local directory as an object store.

Object names map to paths that can never leave the root: each ``/``-separated segment is
percent-encoded (``.``/``..`` and empty segments included), so every file name the store makes
is free of ``#``. That character then marks what is not a directory: ``NAME#`` holds an object,
``NAME#tmp.*`` a write in progress. An object ``a`` and an object ``a/b`` can therefore coexist,
as they can in S3.

An object is one file: a header with its metadata, then its bytes. The header records both
lengths, so a file cut short is an ``IntegrityError`` even without a checksum. Writes go to a
temporary file renamed into place, so readers and concurrent writers see one whole object, old
or new, with its own metadata; two files (data, metadata) could not be swapped in one rename.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import tempfile
from typing import Iterable, Iterator, Mapping
from urllib.parse import quote, unquote

from kvstore.backends.base import Backend, Capabilities, ObjectInfo, OnChunk, ReadResult, read_exactly
from kvstore.errors import BucketNotFound, IntegrityError, PreconditionFailed

_SAFE = "-_.@=+,~!$&'()*;:"
_SEGMENT_MAX = 200  # bytes of one encoded path segment; longer ones continue in "#c" directories
_HEADER = struct.Struct("<4sIQ")  # magic, length of the JSON metadata that follows, length of the bytes after it
_MAGIC = b"KVS1"


def _encode_segment(segment: str) -> list[str]:
    if segment in ("", ".", ".."):
        encoded = "%" + "%2E" * len(segment)  # a lone "%" never comes out of quote(): no clash
    else:
        encoded = quote(segment, safe=_SAFE)
    pieces = []
    while len(encoded) > _SEGMENT_MAX:
        cut = _SEGMENT_MAX
        while encoded[cut - 1] == "%" or encoded[cut - 2] == "%":
            cut -= 1  # never split a %XX escape
        pieces.append(encoded[:cut] + "#c")
        encoded = encoded[cut:]
    return pieces + [encoded]


def _decode_segment(parts: list[str]) -> str:
    encoded = "".join(p[:-2] for p in parts[:-1]) + parts[-1]
    if encoded.startswith("%") and encoded.replace("%2E", "") == "%":
        return "." * encoded.count("%2E")
    return unquote(encoded)


class FileBackend(Backend):
    capabilities = Capabilities(conditional_put=True)

    def __init__(self, config) -> None:
        super().__init__(config)
        self.root = config.location
        os.makedirs(self.root, exist_ok=True)

    def _path(self, name: str) -> str:
        parts: list[str] = []
        for segment in name.split("/"):
            parts.extend(_encode_segment(segment))
        return os.path.join(self.root, *parts)

    def _check_root(self) -> None:
        if not os.path.isdir(self.root):
            raise BucketNotFound(f"store directory {self.root!r} does not exist")

    def put(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        self._check_root()
        path = self._path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        record = json.dumps(dict(metadata)).encode()
        tmp = self._write_temp(path, (_HEADER.pack(_MAGIC, len(record), len(data)), record, data))
        try:
            if if_absent:
                try:
                    os.link(tmp, path + "#")  # atomic create-if-absent
                except FileExistsError:
                    raise PreconditionFailed(f"{name!r} already exists") from None
            else:
                os.replace(tmp, path + "#")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _write_temp(self, path: str, pieces: Iterable[bytes | memoryview]) -> str:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + "#tmp.", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.writelines(pieces)
                if self.config.fsync:
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp

    def _open(self, path: str, name: str, *, metadata: bool = True):
        """(file positioned at the object's bytes, their size, its stat, metadata), or None when absent.

        With ``metadata=False`` the metadata is neither read nor parsed (None), and the file is
        left positioned before it.
        """
        try:
            f = open(path + "#", "rb", buffering=0)
        except (FileNotFoundError, NotADirectoryError):
            self._check_root()
            return None
        try:
            st = os.fstat(f.fileno())
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size or header[:4] != _MAGIC:
                raise IntegrityError(f"{name!r} is not a kvstore object: damaged, or written by an older kvstore "
                                     "that kept metadata in a file of its own (rewrite such a store)")
            _, length, size = _HEADER.unpack(header)
            if _HEADER.size + length + size != st.st_size:
                raise IntegrityError(f"{name!r} is damaged: {st.st_size} bytes on disk, its header accounts for "
                                     f"{_HEADER.size + length + size}")
            return f, size, st, self._read_metadata(f, length, name) if metadata else None
        except BaseException:
            f.close()
            raise

    @staticmethod
    def _read_metadata(f, length: int, name: str) -> dict[str, str]:
        try:
            metadata = json.loads(f.read(length))
        except ValueError:
            raise IntegrityError(f"metadata of {name!r} is not valid JSON") from None
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise IntegrityError(f"metadata of {name!r} is not a map of strings")
        return metadata

    def get_into(self, name: str, buffer: memoryview, on_chunk: OnChunk | None = None) -> ReadResult | None:
        opened = self._open(self._path(name), name)
        if opened is None:
            return None
        f, size, _, metadata = opened
        with f:
            read_exactly(f.readinto, name, size, buffer, on_chunk)
        return ReadResult(size, metadata)

    def head(self, name: str) -> ObjectInfo | None:
        opened = self._open(self._path(name), name)
        if opened is None:
            return None
        f, size, st, metadata = opened
        f.close()
        return ObjectInfo(name, size, metadata, st.st_mtime)

    def delete(self, name: str) -> bool:
        path = self._path(name)
        try:
            os.unlink(path + "#")
        except (FileNotFoundError, NotADirectoryError):
            return False
        self._prune(os.path.dirname(path))
        return True

    def _prune(self, directory: str) -> None:
        """Remove directories the delete left empty, up to the root."""
        while os.path.abspath(directory) != os.path.abspath(self.root):
            try:
                os.rmdir(directory)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    return
                raise
            directory = os.path.dirname(directory)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._check_root()
        yield from self._walk(self.root, [], prefix)

    def _walk(self, directory: str, segments: list[str], prefix: str) -> Iterator[ObjectInfo]:
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            name = entry.name
            if entry.is_dir(follow_symlinks=False) and "#" not in name:
                segment = _decode_segment([name])
                yield from self._descend(entry.path, segments, segment, prefix)
            elif name.endswith("#c") and entry.is_dir(follow_symlinks=False):
                yield from self._continuation(entry.path, segments, [name], prefix)
            elif name.endswith("#") and name.count("#") == 1:
                yield from self._object(entry, segments + [_decode_segment([name[:-1]])], prefix)

    def _descend(self, path: str, segments: list[str], segment: str, prefix: str) -> Iterator[ObjectInfo]:
        full = "/".join(segments + [segment])
        if full.startswith(prefix[: len(full)]):  # only directories that can hold a match
            yield from self._walk(path, segments + [segment], prefix)

    def _continuation(self, path: str, segments: list[str], parts: list[str], prefix: str) -> Iterator[ObjectInfo]:
        for entry in os.scandir(path):
            name = entry.name
            if name.endswith("#c") and entry.is_dir(follow_symlinks=False):
                yield from self._continuation(entry.path, segments, parts + [name], prefix)
            elif entry.is_dir(follow_symlinks=False) and "#" not in name:
                yield from self._walk(entry.path, segments + [_decode_segment(parts + [name])], prefix)
            elif name.endswith("#") and name.count("#") == 1:
                yield from self._object(entry, segments + [_decode_segment(parts + [name[:-1]])], prefix)

    def _object(self, entry: os.DirEntry, segments: list[str], prefix: str) -> Iterator[ObjectInfo]:
        name = "/".join(segments)
        if not name.startswith(prefix):
            return
        try:
            opened = self._open(entry.path[:-1], name, metadata=False)
        except IntegrityError:  # listed at its size on disk, so that verify can report it and gc remove it
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                return
            yield ObjectInfo(name, st.st_size, {}, st.st_mtime)
            return
        if opened is None:  # deleted since the directory was read
            return
        f, size, st, _ = opened
        f.close()
        yield ObjectInfo(name, size, {}, st.st_mtime)
