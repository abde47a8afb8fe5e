"""A local directory as an object store.

Names map to paths as ``kvstore.backends.file_paths`` describes; every path is walked below the
root without following links. An object is one file: a header with its metadata, then its
bytes. The header records both lengths, so a file cut short is an ``IntegrityError`` even
without a checksum. Writes go to a temporary file renamed into place, so readers and concurrent
writers see one whole object, old or new, with its own metadata; two files (data, metadata)
could not be swapped in one rename. A writer killed mid-put leaves its temporary file behind:
``stale_temp_files`` finds such files and ``remove_stale_temp_files`` removes them.

The root is made by the first ``put``, never by opening the store: a read of a root that does
not exist is ``BucketNotFound``, as it is for a missing bucket. Every OS error is a
``KVStoreError`` that names the key.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import secrets
import stat
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, cast

from kvstore.backends.base import Backend, Capabilities, ObjectInfo, OnChunk, ReadResult, pages_of, read_exactly
from kvstore.backends.file_paths import (
    FILE_FLAGS,
    Tree,
    Vanished,
    close_all,
    decode_segment,
    object_parts,
)
from kvstore.backends.file_temp import remove_stale, stale
from kvstore.errors import IntegrityError, PreconditionFailed, StoreUnavailable

if TYPE_CHECKING:
    from kvstore.config import StoreConfig

    # What _open returns: the file at the object's bytes, their size, its stat, its metadata (None unless read).
    _Opened = tuple[io.FileIO, int, os.stat_result, dict[str, str] | None]

log = logging.getLogger(__name__)
_HEADER = struct.Struct("<4sIQ")  # magic, length of the JSON metadata that follows, length of the bytes after it
_MAGIC = b"KVS1"
# Walks a put may restart when concurrent deletes keep pruning its directory; each restart is cheap.
_PUT_ATTEMPTS = 100
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class FileBackend(Backend):
    capabilities = Capabilities(conditional_put=True)

    def __init__(self, config: StoreConfig) -> None:
        super().__init__(config)
        self.root = config.location
        self._tree = Tree(self.root)

    # -- writing -------------------------------------------------------------------------
    def put(self, name: str, data: memoryview, metadata: Mapping[str, str], *, if_absent: bool = False) -> None:
        dirs, base = object_parts(name)
        record = json.dumps(dict(metadata)).encode()
        pieces = (_HEADER.pack(_MAGIC, len(record), len(data)), record, data)
        for _ in range(_PUT_ATTEMPTS):
            try:
                with self._tree.walk(name, dirs, create=True, action="write") as fds:
                    assert fds is not None
                    self._put_in(fds[-1], base, name, pieces, if_absent)
                    return
            except Vanished:
                continue
        raise StoreUnavailable(f"file store {self.root!r}: cannot write {name!r}: concurrent deletes kept "
                               "removing its directory")

    def _put_in(self, leaf: int, base: str, name: str, pieces: Iterable[bytes | memoryview], if_absent: bool) -> None:
        tmp = self._write_temp(leaf, base, name, pieces)
        try:
            if if_absent:
                try:
                    os.link(tmp, base + "#", src_dir_fd=leaf, dst_dir_fd=leaf, follow_symlinks=False)
                except FileExistsError:
                    raise PreconditionFailed(f"{name!r} already exists") from None
            else:
                os.replace(tmp, base + "#", src_dir_fd=leaf, dst_dir_fd=leaf)
            if self.config.fsync:
                os.fsync(leaf)  # the rename itself is durable only once its directory is
        except OSError as exc:
            raise self._tree.os_error(exc, repr(name), "write") from exc
        finally:
            try:
                os.unlink(tmp, dir_fd=leaf)
            except FileNotFoundError:
                pass  # renamed into place
            except OSError:
                log.warning("file store %r: could not remove a temporary file of %r", self.root, name)

    def _write_temp(self, leaf: int, base: str, name: str, pieces: Iterable[bytes | memoryview]) -> str:
        """A new temp file beside the object, holding ``pieces``; mode 0666 less the umask, like any file."""
        tmp = f"{base}#tmp.{secrets.token_hex(8)}"
        try:
            fd = os.open(tmp, _TEMP_FLAGS, 0o666, dir_fd=leaf)
        except FileNotFoundError:  # a delete pruned the directory since we opened it
            raise Vanished() from None
        except OSError as exc:
            raise self._tree.os_error(exc, repr(name), "write") from exc
        try:
            with os.fdopen(fd, "wb") as f:
                f.writelines(pieces)
                if self.config.fsync:
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=leaf)
            if isinstance(exc, OSError):
                raise self._tree.os_error(exc, repr(name), "write") from exc
            raise
        return tmp

    # -- reading -------------------------------------------------------------------------
    def _open(self, name: str, *, metadata: bool = True) -> _Opened | None:
        """(file positioned at the object's bytes, their size, its stat, metadata), or None when absent."""
        dirs, base = object_parts(name)
        with self._tree.walk(name, dirs, create=False, action="read") as fds:
            if fds is None:
                return None
            return self._open_at(fds[-1], base + "#", "/".join(dirs + [base + "#"]), name, metadata=metadata)

    def _open_at(self, parent: int, file_name: str, rel: str, name: str, *, metadata: bool) -> _Opened | None:
        """``_open`` of the object file ``file_name`` in directory ``parent``.

        With ``metadata=False`` the metadata is neither read nor parsed (None), and the file is
        left positioned before it.
        """
        try:
            fd = os.open(file_name, FILE_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENOTDIR):
                raise self._tree.refused(parent, file_name, rel, repr(name)) from exc
            raise self._tree.os_error(exc, repr(name), "read") from exc
        f = os.fdopen(fd, "rb", buffering=0)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._tree.refused(parent, file_name, rel, repr(name))
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size or header[:4] != _MAGIC:
                raise IntegrityError(f"{name!r} is not a kvstore object: damaged, or written by an older kvstore "
                                     "that kept metadata in a file of its own (rewrite such a store)")
            _, length, size = _HEADER.unpack(header)
            if _HEADER.size + length + size != st.st_size:
                raise IntegrityError(f"{name!r} is damaged: {st.st_size} bytes on disk, its header accounts for "
                                     f"{_HEADER.size + length + size}")
            return f, size, st, self._read_metadata(f, length, name) if metadata else None
        except OSError as exc:
            f.close()
            raise self._tree.os_error(exc, repr(name), "read") from exc
        except BaseException:
            f.close()
            raise

    @staticmethod
    def _read_metadata(f: io.FileIO, length: int, name: str) -> dict[str, str]:
        try:
            metadata = json.loads(f.read(length))
        except ValueError:
            raise IntegrityError(f"metadata of {name!r} is not valid JSON") from None
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise IntegrityError(f"metadata of {name!r} is not a map of strings")
        return metadata

    def get_into(self, name: str, buffer: memoryview, on_chunk: OnChunk | None = None) -> ReadResult | None:
        opened = self._open(name)
        if opened is None:
            return None
        f, size, _, metadata = opened
        metadata = cast("dict[str, str]", metadata)  # read: _open's metadata=True
        with f:
            try:
                # local: a file read never waits on a network, so it may land in the caller's
                # buffer directly, a piece at a time while holding the call's lease.
                read_exactly(f.readinto, name, size, buffer, on_chunk, local=True)
            except OSError as exc:
                raise self._tree.os_error(exc, repr(name), "read") from exc
        return ReadResult(size, metadata)

    def get(self, name: str) -> tuple[bytearray, ReadResult] | None:
        """The whole object, sized and read through one open file: a replacement cannot come between."""
        opened = self._open(name)
        if opened is None:
            return None
        f, size, _, metadata = opened
        metadata = cast("dict[str, str]", metadata)  # read: _open's metadata=True
        buffer = bytearray(size)
        view, done = memoryview(buffer), 0
        with f:
            while done < size:
                try:
                    n = f.readinto(view[done:])
                except OSError as exc:
                    raise self._tree.os_error(exc, repr(name), "read") from exc
                if not n:
                    raise IntegrityError(f"{name!r}: {done} of {size} bytes arrived")
                done += n
        return buffer, ReadResult(size, metadata)

    def head(self, name: str) -> ObjectInfo | None:
        opened = self._open(name)
        if opened is None:
            return None
        f, size, st, metadata = opened
        metadata = cast("dict[str, str]", metadata)  # read: _open's metadata=True
        f.close()
        return ObjectInfo(name, size, metadata, st.st_mtime)

    # -- deleting ------------------------------------------------------------------------
    def delete(self, name: str) -> bool:
        dirs, base = object_parts(name)
        with self._tree.walk(name, dirs, create=False, action="delete") as fds:
            if fds is None:
                return False
            leaf, file_name = fds[-1], base + "#"
            try:
                mode = os.stat(file_name, dir_fd=leaf, follow_symlinks=False).st_mode
                if not stat.S_ISREG(mode):
                    raise self._tree.refused(leaf, file_name, "/".join(dirs + [file_name]), repr(name))
                os.unlink(file_name, dir_fd=leaf)
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise self._tree.os_error(exc, repr(name), "delete") from exc
            self._tree.prune(fds, dirs)
            return True

    # -- listing -------------------------------------------------------------------------
    def list_pages(self, prefix: str, start_after: str | None = None) -> Iterator[list[ObjectInfo]]:
        root = self._tree.open_root(f"the objects under {prefix!r}", create=False)
        try:
            yield from pages_of(self._walk(root, [], [], prefix, start_after), prefix, start_after)
        finally:
            os.close(root)

    def _walk(self, fd: int, segments: list[str], parts: list[str], prefix: str,
              start_after: str | None) -> Iterator[ObjectInfo]:
        """Objects below directory ``fd`` in name order: ``segments`` decoded so far, ``parts`` of one continued segment.

        One directory's entries are read and sorted at a time, never the whole tree. A directory
        sorts as its name plus "/", which puts its objects exactly where S3 would list them.
        """
        try:
            entries = sorted(os.scandir(fd), key=lambda e: _sort_key(e.name, parts))
        except FileNotFoundError:  # pruned by a delete since we opened it
            return
        except OSError as exc:
            where = "/".join(segments)
            raise self._tree.os_error(exc, f"the objects under {where!r}", "list") from exc
        for entry in entries:
            name = entry.name
            if entry.is_symlink():
                log.warning("file store %r: skipping %r under %r, a symbolic link (links inside the root are "
                            "not followed)", self.root, name, "/".join(segments))
            elif "#" not in name and entry.is_dir(follow_symlinks=False):
                segment = decode_segment(parts + [name])
                full = "/".join(segments + [segment])
                if full.startswith(prefix[: len(full)]) and not _all_before(full + "/", start_after):
                    yield from self._descend(fd, name, segments + [segment], [], prefix, start_after)
            elif name.endswith("#c") and name.count("#") == 1 and entry.is_dir(follow_symlinks=False):
                yield from self._descend(fd, name, segments, parts + [name], prefix, start_after)
            elif name.endswith("#") and name.count("#") == 1:
                if entry.is_file(follow_symlinks=False):
                    yield from self._object(fd, name, segments + [decode_segment(parts + [name[:-1]])], prefix)
                else:
                    log.warning("file store %r: skipping %r under %r, not a regular file", self.root, name,
                                "/".join(segments))

    def _descend(self, fd: int, entry: str, segments: list[str], parts: list[str], prefix: str,
                 start_after: str | None) -> Iterator[ObjectInfo]:
        try:
            child = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):  # swapped for a link since we read the directory
                return
            raise self._tree.os_error(exc, f"the objects under {'/'.join(segments)!r}", "list") from exc
        try:
            yield from self._walk(child, segments, parts, prefix, start_after)
        finally:
            close_all([child])

    def _object(self, fd: int, file_name: str, segments: list[str], prefix: str) -> Iterator[ObjectInfo]:
        name = "/".join(segments)
        if not name.startswith(prefix):
            return
        try:
            opened = self._open_at(fd, file_name, file_name, name, metadata=False)
        except IntegrityError:  # listed at its size on disk, so that verify can report it and gc remove it
            try:
                st = os.stat(file_name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            yield ObjectInfo(name, st.st_size, {}, st.st_mtime)
            return
        if opened is None:  # deleted since the directory was read
            return
        f, size, st, _ = opened
        f.close()
        yield ObjectInfo(name, size, {}, st.st_mtime)

    # -- maintenance ---------------------------------------------------------------------
    def stale_temp_files(self, older_than_s: float) -> list[tuple[str, int, float]]:
        """Temp files of writes that never finished (a writer killed mid-put), last written at least
        ``older_than_s`` ago: (path relative to the root, size in bytes, age in seconds)."""
        return stale(self._tree, older_than_s)

    def remove_stale_temp_files(self, older_than_s: float) -> tuple[int, int]:
        """Remove what ``stale_temp_files`` finds and the directories that leaves empty.

        Returns (files removed, bytes freed).
        """
        return remove_stale(self._tree, older_than_s)


def _sort_key(entry: str, parts: list[str]) -> str:
    """Where an entry of a directory sorts among its siblings: by the object names below it.

    An object file sorts as its decoded name, a directory as its name and "/", a piece of an
    over-long segment (``#c``) as the part of the name it holds. Anything else (temp files,
    strays) sorts by its raw name; it is skipped either way.
    """
    if entry.endswith("#") and entry.count("#") == 1:
        return decode_segment(parts + [entry[:-1]])
    if entry.endswith("#c") and entry.count("#") == 1:
        return decode_segment(parts + [entry[:-2]])
    if "#" not in entry:
        return decode_segment(parts + [entry]) + "/"
    return entry


def _all_before(dir_prefix: str, start_after: str | None) -> bool:
    """Whether every name starting with ``dir_prefix`` sorts at or before ``start_after``."""
    return start_after is not None and start_after > dir_prefix and not start_after.startswith(dir_prefix)
