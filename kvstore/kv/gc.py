"""``gc``: free space in a store of chunks without ever cutting a chain in the middle.

LMCache looks a prompt's chunks up in order and stops at the first miss, so a chunk whose
predecessor is gone can never be hit, and removing a prompt's first chunk loses all of its
hits. ``gc`` therefore keeps every prompt's stored chunks a prefix of its chain: it removes
damaged chunks and the chunks behind a hole first, then only chunks that no kept chunk depends
on (the tails), deepest first, then oldest. It learns the chains from the ``lmcache-chunk-index``
and ``lmcache-prev`` metadata that ``dump`` and the kvstore LMCache adapter write; chunks without
it ("unchained", e.g. written by LMCache's own S3 connector) are removed only after every chained
tail, newest first (a prompt's first chunks are written first), and counted in the report.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Any

from kvstore.kv.inventory import ChunkInfo, Progress, scan

DAMAGED = ("corrupt", "wrong-size")


@dataclass(frozen=True)
class GCReport:
    """Chunks removed (or, on a dry run, that would be) and why, the bytes they held, and what is left.

    ``reasons`` maps each removed key to ``damaged``, ``orphan`` (behind a hole), ``expired`` or
    ``size``; ``unchained`` counts scanned chunks without chain metadata; ``temp_files`` and
    ``temp_bytes`` are the file store's leftovers of interrupted writes that were (or would be) removed.
    """

    removed: list[ChunkInfo]
    removed_bytes: int
    kept: int
    kept_bytes: int
    dry_run: bool
    reasons: dict[str, str] = field(default_factory=dict)
    unchained: int = 0
    temp_files: int = 0
    temp_bytes: int = 0


class _Chains:
    """Parent links among the chunks of a store, by family and hash, and how many children each has.

    It holds every chunk of the store at once (a chain can only be judged whole), so it keeps
    little per chunk: a parent name and a child count, no per-chunk containers.
    """

    def __init__(self, chunks: list[ChunkInfo]) -> None:
        self.chunks = {c.key: c for c in chunks}
        by_hash = {(c.family, c.chunk_hash): c.key for c in chunks}
        self.parent: dict[str, str | None] = {}
        self.missing_parent: set[str] = set()
        self.children: dict[str, list[str]] = {}  # only chunks that have any
        for c in chunks:
            p = by_hash.get((c.family, c.prev)) if c.prev is not None else None
            self.parent[c.key] = p
            if c.prev is not None and p is None:
                self.missing_parent.add(c.key)
            elif p is not None:
                self.children.setdefault(p, []).append(c.key)
        del by_hash
        self._depth: dict[str, int] = {}

    def depth(self, key: str) -> int:
        """The chunk's index when recorded, else one more than its parent's (0 at an unknown head)."""
        path = []
        k: str | None = key
        while k is not None and k not in self._depth and k not in path:
            c = self.chunks[k]
            if c.index is not None:
                self._depth[k] = c.index
                break
            path.append(k)
            k = self.parent[k]
        base = self._depth.get(k, -1) if k is not None else -1
        for k in reversed(path):
            base += 1
            self._depth[k] = base
        return self._depth[key]


def _holes(chains: _Chains) -> dict[str, str]:
    """Damaged chunks, and every chunk behind a missing or damaged predecessor."""
    dead: dict[str, str] = {k: "damaged" for k, c in chains.chunks.items() if c.status in DAMAGED}
    alive: set[str] = set()
    for key in chains.chunks:
        path = []
        k: str | None = key
        verdict = False
        while k is not None and k not in alive and k not in path:
            if k in dead:
                verdict = True
                break
            path.append(k)
            if k in chains.missing_parent:
                verdict = True
                break
            k = chains.parent[k]
        for p in path:
            if verdict:
                dead.setdefault(p, "orphan")
            else:
                alive.add(p)
    return dead


def plan(chunks: list[ChunkInfo], *, older_than: float | None = None, max_bytes: int | None = None,
         now: float | None = None) -> dict[str, str]:
    """Which chunks to remove and why (see the module docstring for the order)."""
    now = time.time() if now is None else now
    chains = _Chains(chunks)
    doomed = _holes(chains)
    # Kept children per chunk, as a count: each chunk is removed at most once, so a count is enough.
    live_children = {k: n for k, kids in chains.children.items() if (n := sum(ch not in doomed for ch in kids))}

    def remove(key: str, reason: str) -> str | None:
        """Mark ``key`` removed; the parent it leaves without kept children, if any."""
        doomed[key] = reason
        p = chains.parent[key]
        if p is None or p in doomed:
            return None
        live_children[p] -= 1
        return p if not live_children[p] else None

    def expired(key: str) -> bool:
        c = chains.chunks[key]
        return older_than is not None and c.last_modified is not None and now - c.last_modified > older_than

    if older_than is not None:
        stack = [k for k in chains.chunks if k not in doomed and not live_children.get(k) and expired(k)]
        while stack:
            parent = remove(stack.pop(), "expired")
            if parent is not None and expired(parent):
                stack.append(parent)

    if max_bytes is not None:
        total = sum(c.size for k, c in chains.chunks.items() if k not in doomed)

        def rank(key: str) -> tuple[int, int, float, str]:
            c = chains.chunks[key]
            if c.chained:
                return 0, -chains.depth(key), c.last_modified or 0.0, key
            return 1, 0, -(c.last_modified or 0.0), key

        heap = [rank(k) for k in chains.chunks if k not in doomed and not live_children.get(k)]
        heapq.heapify(heap)
        while heap and total > max_bytes:
            key = heapq.heappop(heap)[-1]
            total -= chains.chunks[key].size
            parent = remove(key, "size")
            if parent is not None:
                heapq.heappush(heap, rank(parent))
    return doomed


def _file_backend(store: Any) -> Any:
    """The bare backend when it can find interrupted writes' temp files (the file store), else None."""
    backend = store.backend
    unwrap = getattr(backend, "unwrap", None)
    backend = unwrap() if unwrap is not None else backend
    return backend if hasattr(backend, "stale_temp_files") and hasattr(backend, "remove_stale_temp_files") else None


def stale_temp_files(store: Any, older_than_s: float) -> list[tuple[str, int, float]] | None:
    """``(path, bytes, age)`` of the file store's temp files older than ``older_than_s``; None for other stores."""
    backend = _file_backend(store)
    return None if backend is None else backend.stale_temp_files(older_than_s)


def gc(
    store: Any, *, older_than: float | None = None, max_bytes: int | None = None, prefix: str = "", dry_run: bool = True,
    now: float | None = None, tmp_older_than: float | None = 3600.0, progress: Progress | None = None,
) -> GCReport:
    """Remove damaged and unreachable chunks, then tails written more than ``older_than`` seconds
    ago, then tails until at most ``max_bytes`` remain; and, in a file store, temp files of
    interrupted writes older than ``tmp_older_than`` seconds (None: leave them). ``dry_run``
    (the default) only reports. Reads every chunk's metadata (one HEAD each; ``progress``)."""
    chunks = list(scan(store, prefix, with_metadata=True, progress=progress))
    doomed = plan(chunks, older_than=older_than, max_bytes=max_bytes, now=now)
    removed = sorted((c for c in chunks if c.key in doomed), key=lambda c: (c.last_modified or 0.0, c.key))
    kept = [c for c in chunks if c.key not in doomed]
    if removed and not dry_run:
        store.discard_many([c.key for c in removed])  # the listing just saw them: no HEADs to ask again
    temp_files = temp_bytes = 0
    if tmp_older_than is not None and not prefix:
        backend = _file_backend(store)
        if backend is not None:
            if dry_run:
                stale = backend.stale_temp_files(tmp_older_than)
                temp_files, temp_bytes = len(stale), sum(size for _, size, _ in stale)
            else:
                temp_files, temp_bytes = backend.remove_stale_temp_files(tmp_older_than)
    return GCReport(removed, sum(c.size for c in removed), len(kept), sum(c.size for c in kept), dry_run,
                    {c.key: doomed[c.key] for c in removed}, sum(not c.chained for c in chunks), temp_files, temp_bytes)
