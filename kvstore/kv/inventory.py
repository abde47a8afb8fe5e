"""``scan``: what chunks a store holds, and (with their metadata) what state each is in."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from kvstore.errors import IntegrityError
from kvstore.kv.concurrency import parallel_map, windows
from kvstore.naming import META_CHUNK_INDEX, META_DTYPES, META_PREV, META_SHAPES, META_TOKENS

# Item sizes of the dtypes ``lmcache-dtypes`` names (torch spelling), to check a chunk's size without torch.
_ITEM_SIZES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "uint8": 1, "int8": 1,
               "float8_e4m3fn": 1, "float8_e5m2": 1}
Progress = Callable[[int, "int | None"], None]  # (how many more chunks were looked at, how many there are if known)
# Chunks listed and looked at (HEADs in flight over) before the next are listed.
WINDOW = 1000


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """A stored chunk, its name parsed as LMCache's ``model@world_size@worker_id@hash@dtype[@tags]``.

    ``model`` is as it appears in the name (``/`` replaced by ``_``). The fields after
    ``last_modified`` come from the chunk's metadata, so they are None unless scanned
    ``with_metadata``: ``tokens``, ``status`` (``ok``, ``wrong-size``: its size is not what its
    layout needs, ``corrupt``: the store reports it damaged), ``index`` and ``prev`` (its place in
    its prompt's chain, when the writer recorded it: ``kv dump`` and the kvstore LMCache adapter do).
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
    status: str | None = None
    detail: str = ""
    index: int | None = None
    prev: str | None = None
    tags: str = ""

    @property
    def family(self) -> tuple[str, int, int, str, str]:
        """Chunks of one chain share all of their key but the hash."""
        return self.model, self.world_size, self.worker_id, self.dtype, self.tags

    @property
    def chained(self) -> bool:
        """Whether the writer recorded where this chunk sits in its chain."""
        return self.index is not None or self.prev is not None


def parse_chunk_name(name: str) -> tuple[str, int, int, str, str] | None:
    """``(model, world_size, worker_id, chunk_hash, dtype)`` of an LMCache chunk object name, or None."""
    parts = _parts(name)
    return None if parts is None else parts[:5]


def _parts(name: str) -> tuple[str, int, int, str, str, str] | None:
    parts = name.rsplit("/", 1)[-1].split("@")
    if len(parts) < 5:
        return None
    model, world, worker, chunk_hash, dtype = parts[:5]
    try:
        int(chunk_hash, 16)
        return model, int(world), int(worker), chunk_hash, dtype, "@".join(parts[5:])
    except ValueError:
        return None


def expected_size(metadata: Mapping[str, str]) -> int | None:
    """The bytes ``lmcache-shapes`` and ``lmcache-dtypes`` account for; None when they are absent or unknown."""
    try:
        shapes = [[int(n) for n in s.split("x")] for s in metadata[META_SHAPES].split(";")]
        sizes = [_ITEM_SIZES[d] for d in metadata[META_DTYPES].split(";")]
    except (KeyError, ValueError):
        return None
    if len(shapes) != len(sizes):
        return None
    total = 0
    for shape, item in zip(shapes, sizes):
        count = item
        for n in shape:
            count *= n
        total += count
    return total


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def scan(store: Any, prefix: str = "", *, with_metadata: bool = False, progress: Progress | None = None) -> Iterator[ChunkInfo]:
    """Every object under ``prefix`` whose name is an LMCache chunk name, in the store's listing order.

    Listings carry no object metadata; ``with_metadata`` reads it (one HEAD per chunk) to fill
    in ``tokens``, ``status``, ``index`` and ``prev``. A chunk the store reports damaged is listed
    with status ``corrupt``, never raised. It streams: a window of ``WINDOW`` chunks is listed and
    looked at before the next, so memory does not grow with the store. ``progress(n, None)``
    follows the HEADs (the total is not known before the listing ends).
    """
    chunks = ((info, parsed) for info in store.scan(prefix) if (parsed := _parts(info.key)) is not None)
    for window in windows(chunks, WINDOW):
        yield from _chunk_infos(store, window, with_metadata, progress)


def _chunk_infos(store: Any, infos: list[tuple[Any, tuple[str, int, int, str, str, str]]], with_metadata: bool, progress: Progress | None) -> Iterator[ChunkInfo]:
    def look(item: tuple[Any, Any]) -> Any:
        try:
            return store.stat(item[0].key)
        except IntegrityError as exc:
            return exc
        finally:
            if progress:
                progress(1, None)

    metas = parallel_map(store, look, infos) if with_metadata else [None] * len(infos)
    for (info, (model, world, worker, chunk_hash, dtype, tags)), full in zip(infos, metas):
        base = dict(key=info.key, model=model, world_size=world, worker_id=worker, chunk_hash=chunk_hash, dtype=dtype,
                    size=info.size, last_modified=info.last_modified, tags=tags)
        if full is None and with_metadata:  # deleted between the listing and the HEAD
            continue
        if full is None:
            yield ChunkInfo(**base, tokens=None)
        elif isinstance(full, IntegrityError):
            yield ChunkInfo(**base, tokens=None, status="corrupt", detail=str(full))
        else:
            meta = full.metadata
            expected = expected_size(meta)
            wrong = expected is not None and expected != full.size
            yield ChunkInfo(**{**base, "size": full.size}, tokens=_int(meta.get(META_TOKENS)),
                            status="wrong-size" if wrong else "ok",
                            detail=f"{expected} bytes expected" if wrong else "",
                            index=_int(meta.get(META_CHUNK_INDEX)), prev=meta.get(META_PREV) or None)
