"""``copy``: copy KV chunks from one store to another (any provider, any backend), streaming.

The source listing is consumed a window at a time, never collected whole (a bucket may hold
millions of chunks). Each object of a window is looked at, and read with ``get_into`` into one
of a few reused buffers, on at most as many threads as the narrower store allows in flight.
An object the destination already holds with the same size, user metadata and CRC32C is
skipped, so a copy stopped midway and run again moves only what is missing. Every read is
checked against the CRC32C stored with the object before anything is written: a damaged
source object is a failure, never a destination object.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvstore.backends.base import NOT_LISTED, ObjectInfo
from kvstore.errors import AuthError, BucketNotFound, ConfigError, IntegrityError, KVStoreError
from kvstore.kv.concurrency import parallel_map, windows
from kvstore.kv.inventory import parse_chunk_name
from kvstore.layers.integrity import CRC_KEY
from kvstore.store import RESERVED_META_PREFIX

# What happened to one object. ``gone``: listed, then deleted before it could be read.
COPY, REPLACE, SKIP, FAILED, GONE = "copy", "replace", "skip", "failed", "gone"
# Store-wide failures: every other object would fail the same way, so the copy stops at once.
_FATAL = (AuthError, BucketNotFound, ConfigError)
_PROBE_KEY = "kvstore-cp-probe"  # stat'ed once at the destination: a miss proves the bucket is there
_DAMAGED = ObjectInfo("", -1)  # a destination object that cannot be read back: always replaced

OnItem = Callable[[str, str, int], None]  # (key, action, bytes), in listing order, after each window
Progress = Callable[[int, int], None]  # (objects looked at, bytes written) since the last call
Outcome = tuple[str, int, str]  # (action, bytes written, reason of a failure) of one object
RAY_WINDOW = 1000  # listed objects per Ray task: few enough tasks, small enough messages


@dataclass(frozen=True)
class CopyFailure:
    key: str
    reason: str


@dataclass(frozen=True)
class CopyReport:
    """What a copy did (or, on a dry run, would do).

    ``copied``: objects the destination did not have; ``replaced``: objects it had with another
    size, checksum or metadata (overwritten); ``skipped``: identical ones; ``failures``: objects
    not written, with the reason; ``bytes``: bytes written (or to write); ``vanished``: objects
    deleted from the source between the listing and the read.
    """

    copied: int
    skipped: int
    replaced: int
    failures: list[CopyFailure]
    bytes: int
    seconds: float
    dry_run: bool = False
    vanished: int = 0

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def objects_per_s(self) -> float:
        return (self.copied + self.replaced) / self.seconds if self.seconds > 0 else 0.0

    @property
    def gibps(self) -> float:
        """Write throughput in GiB/s (2^30 bytes)."""
        return self.bytes / self.seconds / 2**30 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "copied": self.copied, "skipped": self.skipped, "replaced": self.replaced,
                "failed": self.failed, "vanished": self.vanished, "bytes": self.bytes, "seconds": round(self.seconds, 6),
                "objects_per_s": round(self.objects_per_s, 3), "gibps": round(self.gibps, 6),
                "failures": [{"key": f.key, "reason": f.reason} for f in self.failures]}


class _Buffers:
    """Read buffers reused across objects: one per busy worker, each as large as the largest object seen."""

    def __init__(self) -> None:
        self._free: list[bytearray] = []
        self._lock = threading.Lock()
        self._largest = 0

    def take(self, size: int) -> bytearray:
        with self._lock:
            self._largest = max(self._largest, size)
            buffer = self._free.pop() if self._free else None
            want = self._largest
        # Growing straight to the largest size seen spares a reallocation per slightly larger chunk.
        return buffer if buffer is not None and len(buffer) >= size else bytearray(want)

    def give(self, buffer: bytearray) -> None:
        with self._lock:
            self._free.append(buffer)


@dataclass
class _Totals:
    copied: int = 0
    skipped: int = 0
    replaced: int = 0
    vanished: int = 0
    bytes: int = 0
    failures: list[CopyFailure] = field(default_factory=list)


def user_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The metadata a caller may write: without kvstore's own (the destination adds its own CRC32C)."""
    return {k: v for k, v in metadata.items() if not k.startswith(RESERVED_META_PREFIX)}


def identical(a: ObjectInfo, b: ObjectInfo) -> bool:
    """Same size and user metadata, and the same CRC32C when both carry one.

    Without a checksum on one side the bytes are not compared: for LMCache chunks the key is a
    hash of the tokens, so a same-size chunk with the same metadata under it holds the same KV.
    """
    if a.size != b.size or user_metadata(a.metadata) != user_metadata(b.metadata):
        return False
    crc_a, crc_b = a.metadata.get(CRC_KEY), b.metadata.get(CRC_KEY)
    return crc_a is None or crc_b is None or crc_a.lower() == crc_b.lower()


def _place(config: Any) -> tuple[tuple[Any, ...], str]:
    """(which store, the path of names under it) for telling stores and their nesting apart."""
    if config.profile == "file":
        return ("file", os.path.realpath(config.location)), config.prefix.strip("/")
    if config.is_s3:
        return ("s3", config.base_endpoint or config.region, config.bucket), config.prefix.strip("/")
    return (config.profile, config.location), config.prefix.strip("/")


def check_distinct(src_config: Any, dst_config: Any) -> None:
    """Raise ``ConfigError`` when the destination is the source, or lies inside it (the copy would copy itself)."""
    (src_store, src_path), (dst_store, dst_path) = _place(src_config), _place(dst_config)
    if src_store != dst_store:
        return
    if src_path == dst_path:
        raise ConfigError(f"source and destination are the same store ({src_config.url}): nothing to copy")
    if not src_path or dst_path.startswith(src_path + "/"):
        raise ConfigError(f"the destination {dst_config.url} lies inside the source {src_config.url}: "
                          "the copy would list its own writes")


def _destination_info(dst: Any, key: str) -> ObjectInfo | None:
    try:
        info: ObjectInfo | None = dst.stat(key)
        return info
    except BucketNotFound:
        if dst.config.profile == "file":  # a file store's root is made by its first put
            return None
        raise
    except IntegrityError:  # damaged at the destination (an unreadable header): overwrite it
        return _DAMAGED


def _copy_one(src: Any, dst: Any, listed: ObjectInfo, buffers: _Buffers, dry_run: bool) -> Outcome:
    """(action, bytes written, reason of a failure) for one listed object."""
    info = listed
    if info.metadata is NOT_LISTED:  # S3 and file listings carry no metadata: one HEAD
        info = src.stat(listed.key)
        if info is None:
            return GONE, 0, ""
    there = _destination_info(dst, info.key)
    if there is not None and identical(info, there):  # never for _DAMAGED, whose size is -1
        return SKIP, 0, ""
    action = COPY if there is None else REPLACE
    if dry_run:
        return action, info.size, ""
    buffer = buffers.take(info.size)
    try:
        size = src.get_into(info.key, buffer)
        if size is None:
            return GONE, 0, ""
        if size != info.size:
            return FAILED, 0, f"replaced at the source while being copied ({size} bytes read, {info.size} listed)"
        # get_into has checked the bytes against the CRC32C stored with them (the integrity layer
        # does whenever the object carries one) and raised IntegrityError, caught by the caller,
        # on a mismatch: only verified bytes get this far.
        dst.put(info.key, memoryview(buffer)[:size], user_metadata(info.metadata))
    finally:
        buffers.give(buffer)
    return action, size, ""


def _listing(src: Any, prefix: str, model: str | None) -> Generator[ObjectInfo, None, None]:
    """The source's objects under ``prefix``; with ``model``, only LMCache chunks of that model."""
    wanted = None if model is None else model.replace("/", "_")  # as LMCache writes it into object names
    scan = src.scan(prefix)
    try:
        for info in scan:
            if wanted is None or ((parsed := parse_chunk_name(info.key)) is not None and parsed[0] == wanted):
                yield info
    finally:
        scan.close()  # a copy that stops early releases the listing's connection now


def copy(
    src: Any, dst: Any, *, prefix: str = "", model: str | None = None, dry_run: bool = False, window: int | None = None,
    on_item: OnItem | None = None, progress: Progress | None = None, ray_address: str | None = None,
) -> CopyReport:
    """Copy every object under ``prefix`` (only ``model``'s chunks, when given) from ``src`` to ``dst``.

    Skips objects ``dst`` already holds identically, overwrites different ones, carries each
    object's user metadata over, and verifies each read against its stored CRC32C. A failure of
    one object (damaged, unreadable, refused) is recorded and the copy goes on; a store-wide one
    (missing bucket, bad credentials) is raised. ``window`` (default: four times the smaller
    ``max_inflight``; 1000 on Ray) bounds how many listed objects are in hand at once. ``dry_run``
    reads metadata only and writes nothing. ``ray_address`` (``""``: ``ray.init()``'s default)
    copies the windows on a pool of Ray actors that open both stores from their configurations
    (``kvstore.kv.copy_ray``); the listing stays on this process.
    """
    check_distinct(src.config, dst.config)
    narrow = src if src.config.max_inflight <= dst.config.max_inflight else dst
    size = window or (RAY_WINDOW if ray_address is not None else 4 * narrow.config.max_inflight)
    totals = _Totals()
    started = time.perf_counter()
    with contextlib.closing(_listing(src, prefix, model)) as listing:
        batches = windows(listing, size)
        first = next(batches, [])  # a missing source fails here, before anything is written
        _destination_info(dst, _PROBE_KEY)  # and a missing destination bucket here
        todo = itertools.chain([first] if first else [], batches)
        if ray_address is None:
            buffers = _Buffers()
            done: Iterable[tuple[list[ObjectInfo], list[Outcome]]] = (
                (batch, copy_window(src, dst, batch, buffers, dry_run)) for batch in todo)
        else:
            from kvstore.kv.copy_ray import copy_on_ray

            done = copy_on_ray(src.config, dst.config, todo, ray_address, dry_run)
        for batch, results in done:
            _tally(totals, batch, results, on_item, progress)
    return CopyReport(totals.copied, totals.skipped, totals.replaced, totals.failures, totals.bytes,
                      time.perf_counter() - started, dry_run, totals.vanished)


def copy_window(src: Any, dst: Any, batch: list[ObjectInfo], buffers: _Buffers, dry_run: bool) -> list[Outcome]:
    """Copy one window of the listing, all of it in flight at once (up to the narrower store's bound).

    (action, bytes written, reason of a failure) per object, in order; a store-wide failure is raised.
    """
    narrow = src if src.config.max_inflight <= dst.config.max_inflight else dst

    def one(info: ObjectInfo) -> Outcome:
        try:
            return _copy_one(src, dst, info, buffers, dry_run)
        except _FATAL:
            raise
        except KVStoreError as exc:
            return FAILED, 0, f"{type(exc).__name__}: {exc}"

    return parallel_map(narrow, one, batch)


def _tally(totals: _Totals, batch: list[ObjectInfo], results: list[Outcome], on_item: OnItem | None,
           progress: Progress | None) -> None:
    written = 0
    for info, (action, nbytes, reason) in zip(batch, results):
        if action == FAILED:
            totals.failures.append(CopyFailure(info.key, reason))
        elif action == GONE:
            totals.vanished += 1
        elif action == SKIP:
            totals.skipped += 1
        else:
            totals.copied += action == COPY
            totals.replaced += action == REPLACE
            written += nbytes
        if on_item:
            on_item(info.key, action, nbytes or info.size)
    totals.bytes += written
    if progress:
        progress(len(batch), written)
