"""Finding and removing the temp files of file-store writers that never finished.

A writer killed mid-put (SIGKILL, OOM, power loss) leaves ``NAME#tmp.*`` beside where the
object would have landed; nothing else ever removes it. A live writer touches its temp file as
it writes, so a threshold of minutes tells the dead from the busy. Listing never reports these
files as objects; ``kv gc`` and ``kv stat`` use what is here.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator

from kvstore.backends.file_paths import DIR_FLAGS, Tree, Vanished, close_all, is_temp
from kvstore.errors import KVStoreError

_WHAT = "the store's temporary files"


def _temps(tree: Tree, older_than_s: float) -> Iterator[tuple[int, list[str], str, int, float]]:
    """(directory fd, its path from the root, file name, size, age) of each stale temp file."""
    if older_than_s < 0:
        raise ValueError(f"older_than_s must be >= 0, got {older_than_s!r}")
    root = tree.open_root(_WHAT, create=False)
    try:
        yield from _walk(tree, root, [], time.time(), older_than_s)
    finally:
        os.close(root)


def _walk(tree: Tree, fd: int, rel: list[str], now: float, older_than_s: float) -> Iterator[tuple[int, list[str], str, int, float]]:
    try:
        entries = list(os.scandir(fd))
    except FileNotFoundError:  # pruned since we opened it
        return
    except OSError as exc:
        raise tree.os_error(exc, _WHAT, "look for") from exc
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            try:
                child = os.open(entry.name, DIR_FLAGS, dir_fd=fd)
            except OSError:  # gone, or swapped for a link: nothing of ours to clean below it
                continue
            try:
                yield from _walk(tree, child, rel + [entry.name], now, older_than_s)
            finally:
                close_all([child])
        elif is_temp(entry.name):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # renamed into place: the write finished
                continue
            age = now - st.st_mtime
            if stat.S_ISREG(st.st_mode) and age >= older_than_s:
                yield fd, rel, entry.name, st.st_size, age


def stale(tree: Tree, older_than_s: float) -> list[tuple[str, int, float]]:
    return [("/".join(rel + [name]), size, age) for _, rel, name, size, age in _temps(tree, older_than_s)]


def remove_stale(tree: Tree, older_than_s: float) -> tuple[int, int]:
    removed = freed = 0
    emptied: set[tuple[str, ...]] = set()
    for fd, rel, name, size, _ in _temps(tree, older_than_s):
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise tree.os_error(exc, f"the temporary file {'/'.join(rel + [name])!r}", "remove") from exc
        removed += 1
        freed += size
        emptied.add(tuple(rel))
    for parts in sorted(emptied, key=len, reverse=True):
        try:
            with tree.walk(_WHAT, list(parts), create=False, action="clean up") as fds:
                if fds is not None:
                    tree.prune(fds, list(parts))
        except (Vanished, OSError, KVStoreError):
            continue
    return removed, freed
