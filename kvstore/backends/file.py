"""A local directory as an object store.

Object names map to paths that can never leave the root: each ``/``-separated segment is
percent-encoded (``.``/``..`` and empty segments included), so every file name the store makes
is free of ``#``. That character then marks what is not a directory: ``NAME#`` holds an object's
bytes, ``NAME#m`` its metadata, ``NAME#tmp.*`` a write in progress. An object ``a`` and an object
``a/b`` can therefore coexist, as they can in S3. Writes go to a temporary file renamed into
place, so readers see an old or a new object, never a torn one.

Data and metadata are two files, so they cannot be swapped in one rename. The metadata names
the inode of the data file it describes; a reader that finds another inode raced a writer and
reads again, instead of checking new bytes against old metadata.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from typing import Iterator, Mapping
from urllib.parse import quote, unquote

from kvstore.backends.base import Backend, Capabilities, ObjectInfo, ReadResult, read_exactly
from kvstore.errors import BucketNotFound, IntegrityError, PreconditionFailed

_SAFE = "-_.@=+,~!$&'()*;:"
_SEGMENT_MAX = 200  # bytes of one encoded path segment; longer ones continue in "#c" directories


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
        tmp = self._write_temp(path, lambda f: f.write(data))
        try:
            inode = os.stat(tmp).st_ino
            if if_absent:
                try:
                    os.link(tmp, path + "#")  # atomic create-if-absent; metadata only once it is ours
                except FileExistsError:
                    raise PreconditionFailed(f"{name!r} already exists") from None
                self._write_meta(path, metadata, inode)
            else:
                self._write_meta(path, metadata, inode)
                os.replace(tmp, path + "#")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _write_temp(self, path: str, write) -> str:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + "#tmp.", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                if self.config.fsync:
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp

    def _write_meta(self, path: str, metadata: Mapping[str, str], inode: int) -> None:
        record = json.dumps({"inode": inode, "metadata": dict(metadata)}).encode()
        os.replace(self._write_temp(path, lambda f: f.write(record)), path + "#m")

    def _read_meta(self, path: str, inode: int) -> dict[str, str] | None:
        """The metadata of data file ``inode``; {} when there is none; None when it belongs to another."""
        try:
            with open(path + "#m", "rb") as f:
                record = json.loads(f.read())
        except FileNotFoundError:
            return {}
        except ValueError:
            raise IntegrityError(f"metadata of {path!r} is not valid JSON") from None
        return record["metadata"] if record.get("inode") == inode else None

    def _open_with_meta(self, name: str):
        """(open data file, size, metadata) consistent with each other, or None when absent."""
        path = self._path(name)
        for _ in range(50):
            try:
                f = open(path + "#", "rb", buffering=0)
            except (FileNotFoundError, NotADirectoryError):
                self._check_root()
                return None
            st = os.fstat(f.fileno())
            metadata = self._read_meta(path, st.st_ino)
            if metadata is not None:
                return f, st, metadata
            f.close()
            time.sleep(0.001)  # a writer is between its two renames
        raise IntegrityError(f"metadata of {name!r} does not belong to its data")

    def get_into(self, name: str, buffer: memoryview) -> ReadResult | None:
        opened = self._open_with_meta(name)
        if opened is None:
            return None
        f, st, metadata = opened
        with f:
            read_exactly(f.readinto, name, st.st_size, buffer)
        return ReadResult(st.st_size, metadata)

    def head(self, name: str) -> ObjectInfo | None:
        opened = self._open_with_meta(name)
        if opened is None:
            return None
        f, st, metadata = opened
        f.close()
        return ObjectInfo(name, st.st_size, metadata, st.st_mtime)

    def delete(self, name: str) -> bool:
        path = self._path(name)
        try:
            os.unlink(path + "#")
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            os.unlink(path + "#m")
        except FileNotFoundError:
            pass
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
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return
        yield ObjectInfo(name, st.st_size, {}, st.st_mtime)
