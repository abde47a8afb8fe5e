"""``scan`` and ``gc``: what chunks a store holds, and removing the oldest of them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

from kvstore.kv.concurrency import parallel_map
from kvstore.lmcache.naming import META_TOKENS


@dataclass(frozen=True)
class ChunkInfo:
    """A stored chunk, its name parsed as LMCache's ``model@world_size@worker_id@hash@dtype[@tags]``.

    ``model`` is as it appears in the name (``/`` replaced by ``_``); ``tokens`` comes from the
    chunk's metadata: None unless scanned ``with_metadata``, and for chunks LMCache wrote itself.
    """

    key: str
    model: str
    world_size: int
    worker_id: int
    chunk_hash: str
    dtype: str
    size: int
    tokens: int | None
    last_modified: float | None


def parse_chunk_name(name: str) -> tuple[str, int, int, str, str] | None:
    """``(model, world_size, worker_id, chunk_hash, dtype)`` of an LMCache chunk object name, or None."""
    base = name.rsplit("/", 1)[-1]
    parts = base.split("@")
    if len(parts) < 5:
        return None
    model, world, worker, chunk_hash, dtype = parts[:5]
    try:
        int(chunk_hash, 16)
        return model, int(world), int(worker), chunk_hash, dtype
    except ValueError:
        return None


def scan(store: Any, prefix: str = "", *, with_metadata: bool = False) -> Iterator[ChunkInfo]:
    """Every object under ``prefix`` whose name is an LMCache chunk name, sorted by name.

    Listings carry no object metadata; ``with_metadata`` reads it (one HEAD per chunk) to fill
    in ``tokens``.
    """
    infos = [(info, parsed) for info in store.scan(prefix) if (parsed := parse_chunk_name(info.key)) is not None]
    metas = parallel_map(store, lambda i: store.stat(i[0].key), infos) if with_metadata else [None] * len(infos)
    for (info, parsed), full in zip(infos, metas):
        tokens = full.metadata.get(META_TOKENS) if full is not None else None
        yield ChunkInfo(info.key, *parsed, size=info.size, tokens=int(tokens) if tokens and tokens.isdigit() else None,
                        last_modified=info.last_modified)


@dataclass(frozen=True)
class GCReport:
    """Chunks removed (or, on a dry run, that would be), the bytes they held, and what is left."""

    removed: list[ChunkInfo]
    removed_bytes: int
    kept: int
    kept_bytes: int
    dry_run: bool


def gc(
    store: Any, *, older_than: float | None = None, max_bytes: int | None = None, prefix: str = "", dry_run: bool = True,
    now: float | None = None,
) -> GCReport:
    """Remove chunks last written more than ``older_than`` seconds ago, then the oldest ones
    until at most ``max_bytes`` remain. ``dry_run`` (the default) only reports."""
    now = time.time() if now is None else now
    chunks = sorted(scan(store, prefix), key=lambda c: (c.last_modified or 0.0, c.key))
    def expired(c: ChunkInfo) -> bool:
        return older_than is not None and c.last_modified is not None and now - c.last_modified > older_than

    doomed = [c for c in chunks if expired(c)]
    rest = [c for c in chunks if not expired(c)]
    if max_bytes is not None:
        total = sum(c.size for c in rest)
        while rest and total > max_bytes:
            total -= rest[0].size
            doomed.append(rest.pop(0))
    if doomed and not dry_run:
        store.delete_many([c.key for c in doomed])
    return GCReport(doomed, sum(c.size for c in doomed), len(rest), sum(c.size for c in rest), dry_run)
