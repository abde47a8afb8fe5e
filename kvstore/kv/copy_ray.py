"""The Ray path of ``copy``: the driver lists, a pool of actors copies window after window.

The driver streams the source listing in windows (``copy.RAY_WINDOW`` objects by default) and
hands each one to the next of a few actors, each of which opened both stores once (from their
resolved configurations, credentials included) and runs ``copy_window``, the same per-object
work as one process: skip identical, replace, verify, carry metadata, with up to the narrower
store's ``max_inflight`` objects in flight. At most two windows per actor are out at a time;
results come back in listing order and merge into the same ``CopyReport``. Ray restarts an
actor that dies and retries its window; a retried window skips what the dead attempt wrote,
so nothing is written twice or left half-written. Needs ``pip install 'kvcache-store[ray]'``.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from kvstore.backends.base import NOT_LISTED, ObjectInfo
from kvstore.errors import ConfigError, KVStoreError
from kvstore.kv.copy import Outcome

WINDOWS_PER_ACTOR = 2  # one being copied, one queued behind it: an actor never waits for the driver


class CopyActor:
    """One Ray actor: both stores, opened once, copying window after window."""

    def __init__(self, src_config: Any, dst_config: Any) -> None:
        import kvstore
        from kvstore.kv.copy import _Buffers

        self.src, self.dst = kvstore.open_config(src_config), kvstore.open_config(dst_config)
        self.buffers = _Buffers()

    def copy(self, batch: list[ObjectInfo], dry_run: bool) -> list[Outcome]:
        from kvstore.kv.copy import copy_window

        return copy_window(self.src, self.dst, batch, self.buffers, dry_run)

    def close(self) -> None:
        self.src.close()
        self.dst.close()


def _portable(config: Any) -> Any:
    """``config`` as Ray can pickle it: its read-only mappings as plain dicts."""
    return dataclasses.replace(config, options=dict(config.options), sources=dict(config.sources))


def _plain(info: ObjectInfo) -> ObjectInfo:
    return info if info.metadata is NOT_LISTED else dataclasses.replace(info, metadata=dict(info.metadata))


def copy_on_ray(src_config: Any, dst_config: Any, batches: Iterable[list[ObjectInfo]], address: str, dry_run: bool,
                actors: int | None = None) -> Iterator[tuple[list[ObjectInfo], list[Outcome]]]:
    """Copy ``batches`` on the Ray cluster at ``address`` ("" for ``ray.init()``'s default); (batch, outcomes) in order."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--ray needs Ray: pip install 'kvcache-store[ray]'") from exc
    api: Any = ray  # parts of Ray's API carry no annotations
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address or None, log_to_driver=False)
    pool: list[Any] = []
    try:
        cpus = api.cluster_resources().get("CPU", 1)
        count = actors or max(1, int(cpus))
        # An actor that dies is restarted and its window retried, as often as it takes.
        remote = api.remote(num_cpus=min(1.0, cpus / count), max_restarts=-1, max_task_retries=-1)(CopyActor)
        pool = [remote.remote(_portable(src_config), _portable(dst_config)) for _ in range(count)]
        pending: deque[tuple[list[ObjectInfo], Any]] = deque()
        for n, batch in enumerate(batches):
            pending.append((batch, pool[n % count].copy.remote([_plain(i) for i in batch], dry_run)))
            if len(pending) >= WINDOWS_PER_ACTOR * count:
                yield from _finished(api, pending)
        while pending:
            yield from _finished(api, pending)
        api.get([actor.close.remote() for actor in pool])
    finally:
        for actor in pool:
            api.kill(actor)
        if started_here:
            ray.shutdown()


def _finished(api: Any, pending: deque[tuple[list[ObjectInfo], Any]]) -> Iterator[tuple[list[ObjectInfo], list[Outcome]]]:
    """The oldest window once done, then those behind it already done: in listing order."""
    timeout = None  # the first one waited for
    while pending:
        ready, _ = api.wait([pending[0][1]], num_returns=1, timeout=timeout)
        if not ready:
            return
        timeout = 0
        batch, ref = pending.popleft()
        try:
            results: list[Outcome] = api.get(ref)
        except api.exceptions.RayTaskError as exc:  # a store-wide failure on an actor: the same error as here
            if isinstance(exc.cause, KVStoreError):
                raise exc.cause from None
            raise
        yield batch, results
