"""Running a store call over many chunks at once, for the calls ``KVStore`` has no batch form of."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def parallel_map(store: Any, fn: Callable[[Any], T], items: list[Any]) -> list[T]:
    """``fn`` over ``items`` on a few threads, results in order (the store bounds what is really in flight)."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(len(items), store.config.max_inflight)) as pool:
        return list(pool.map(fn, items))


def windows(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter): a stream worked on a window at a time."""
    it = iter(items)
    while window := list(itertools.islice(it, size)):
        yield window
