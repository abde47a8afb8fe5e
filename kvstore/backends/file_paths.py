"""Where the file store keeps an object, and how it gets there without leaving its root.

Object names map to paths that can never leave the root: each ``/``-separated segment is
percent-encoded (``.``/``..`` and empty segments included), so every file name the store makes
is free of ``#``. That character then marks what is not a directory: ``NAME#`` holds an object,
``NAME#tmp.*`` a write in progress, ``NAME#c`` a directory continuing a segment too long for one
file name. An object ``a`` and an object ``a/b`` can therefore coexist, as they can in S3.

Every path below the root is walked one directory at a time with ``openat``-style calls and
``O_NOFOLLOW``: a symbolic link planted inside the root (``root/sub -> /elsewhere``) is refused,
never followed, and a directory a concurrent delete prunes mid-walk is noticed (``Vanished``).
The root itself may be a link: that is the operator's choice, not something inside the store.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from urllib.parse import quote, unquote

from kvstore.errors import BucketNotFound, InvalidKey, KVStoreError, StoreUnavailable

_SAFE = "-_.@=+,~!$&'()*;:"
SEGMENT_MAX = 200  # bytes of one encoded path segment; longer ones continue in "#c" directories
TEMP_MARK = "#tmp."
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted as an object would otherwise hang the open; no effect on regular files.
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# Errors another attempt may cure; everything else about a local disk stays until someone acts.
_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EBUSY}


class Vanished(Exception):
    """A directory on the way was removed while we walked it (a delete pruned it): walk again."""


def encode_segment(segment: str) -> list[str]:
    if segment in ("", ".", ".."):
        encoded = "%" + "%2E" * len(segment)  # a lone "%" never comes out of quote(): no clash
    else:
        encoded = quote(segment, safe=_SAFE)
    pieces = []
    while len(encoded) > SEGMENT_MAX:
        cut = SEGMENT_MAX
        while encoded[cut - 1] == "%" or encoded[cut - 2] == "%":
            cut -= 1  # never split a %XX escape
        pieces.append(encoded[:cut] + "#c")
        encoded = encoded[cut:]
    return pieces + [encoded]


def decode_segment(parts: list[str]) -> str:
    encoded = "".join(p[:-2] for p in parts[:-1]) + parts[-1]
    if encoded.startswith("%") and encoded.replace("%2E", "") == "%":
        return "." * encoded.count("%2E")
    return unquote(encoded)


def object_parts(name: str) -> tuple[list[str], str]:
    """The directories an object lives in (relative to the root) and the base of its file name."""
    parts: list[str] = []
    for segment in name.split("/"):
        parts.extend(encode_segment(segment))
    return parts[:-1], parts[-1]


def is_temp(file_name: str) -> bool:
    return TEMP_MARK in file_name


def close_all(fds: list[int]) -> None:
    for fd in reversed(fds):
        os.close(fd)


class Tree:
    """The store's root directory: opening it, walking below it, and naming what went wrong."""

    def __init__(self, root: str) -> None:
        self.root = root

    def os_error(self, exc: OSError, what: str, action: str) -> KVStoreError:
        """The error to raise for ``exc`` met while doing ``action`` to ``what`` (a key, quoted by us).

        The message never quotes the OS error's own file names: they may be a temp file's.
        """
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno == errno.ENAMETOOLONG:
            return InvalidKey(f"{what}: the name is too long for the file system under {self.root!r}")
        return StoreUnavailable(f"file store {self.root!r}: cannot {action} {what}: {reason}",
                                retryable=exc.errno in _TRANSIENT)

    def refused(self, parent: int, entry: str, rel: str, what: str) -> KVStoreError:
        """Why ``entry`` (in directory ``parent``, ``rel`` from the root) is not what the store put there."""
        try:
            mode = os.stat(entry, dir_fd=parent, follow_symlinks=False).st_mode
        except OSError:
            mode = 0
        if stat.S_ISLNK(mode):
            return StoreUnavailable(f"file store {self.root!r}: {what} leads through {rel!r}, a symbolic link; "
                                    "the store does not follow links inside its root", retryable=False)
        kind = ("a directory" if stat.S_ISDIR(mode) else "a file" if stat.S_ISREG(mode)
                else "a special file" if mode else "not what the store made")
        return StoreUnavailable(f"file store {self.root!r}: {what}: {rel!r} is {kind}, where the store keeps "
                                f"{'an object' if entry.endswith('#') else 'a directory'}", retryable=False)

    def open_root(self, what: str, *, create: bool) -> int:
        """A descriptor of the root; a missing root is ``BucketNotFound`` unless ``create``."""
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            if not create:
                raise BucketNotFound(f"file store root {self.root!r} does not exist") from exc
        except NotADirectoryError as exc:
            raise BucketNotFound(f"file store root {self.root!r} is not a directory") from exc
        except OSError as exc:
            raise self.os_error(exc, what, "open the store for") from exc
        try:
            os.makedirs(self.root, exist_ok=True)
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise self.os_error(exc, what, "create the store root for") from exc

    @contextlib.contextmanager
    def walk(self, name: str, dirs: list[str], *, create: bool, action: str) -> Iterator[list[int] | None]:
        """Descriptors of the root and each of ``dirs`` below it (closed on exit); None when one is missing.

        With ``create`` missing directories are made; one that vanishes under us raises ``Vanished``.
        """
        what = repr(name)
        fds = [self.open_root(what, create=create)]
        try:
            for i, segment in enumerate(dirs):
                fd = self._open_dir(fds[-1], segment, "/".join(dirs[: i + 1]), what, create=create, action=action)
                if fd is None:
                    yield None
                    return
                fds.append(fd)
            yield fds
        finally:
            close_all(fds)

    def _open_dir(self, parent: int, segment: str, rel: str, what: str, *, create: bool, action: str) -> int | None:
        if create:
            try:
                os.mkdir(segment, dir_fd=parent)
            except FileExistsError:
                pass
            except FileNotFoundError:  # the parent itself was pruned after we opened it
                raise Vanished() from None
            except OSError as exc:
                raise self.os_error(exc, what, action) from exc
        try:
            return os.open(segment, DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if create:  # pruned between our mkdir and our open
                raise Vanished() from None
            return None
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise self.refused(parent, segment, rel, what) from exc
            raise self.os_error(exc, what, action) from exc

    def prune(self, fds: list[int], dirs: list[str]) -> None:
        """Remove the directories of ``dirs`` left empty, deepest first; ``fds[i]`` holds ``dirs[i]``."""
        for i in reversed(range(len(dirs))):
            try:
                os.rmdir(dirs[i], dir_fd=fds[i])
            except OSError:  # not empty (a put is landing there), gone already, or not ours to remove
                return
