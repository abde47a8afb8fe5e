"""``dump``: write a prompt's KV cache into a store as the chunks LMCache would write.

``write_chunks`` is its second half (chunks whose keys are already computed), which
``dump_corpus`` calls once per prompt after checking a whole batch of prompts at once.

Resumable and idempotent: chunks already in the store are skipped (one batched existence
check first), the rest are written a batch at a time, each put atomic, so a dump stopped
midway and run again writes only what is missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvstore.errors import BucketNotFound, ConfigError, PreconditionFailed
from kvstore.kv.concurrency import parallel_map
from kvstore.kv.keys import ChunkKey, chunk_keys
from kvstore.kv.layout import KVLayout, chunk_metadata
from kvstore.kv.tensors import ChunkSource, chunk_source

Progress = Callable[[int, int], None]  # (chunks done, bytes written), called after each batch


@dataclass(frozen=True)
class DumpReport:
    """What a dump did: chunks written and skipped (already stored), bytes written, and the
    seconds spent checking, copying and writing (key computation not included)."""

    written: int
    skipped: int
    bytes: int
    seconds: float

    @property
    def chunks(self) -> int:
        return self.written + self.skipped

    @property
    def gbps(self) -> float:
        """Write throughput in GB/s (10^9 bytes)."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def dump(
    store: Any, tokens: Sequence[int] | Any, kv: Any, *, model: str, layout: KVLayout, world_size: int = 1,
    worker_id: int = 0, save_unfull_chunk: bool = True, batch_chunks: int | None = None, progress: Progress | None = None,
    engine_config: Any = None, if_absent: bool = False,
) -> DumpReport:
    """Store the KV cache ``kv`` of ``tokens`` as LMCache chunks; see ``kvstore.kv.tensors`` for ``kv``'s forms.

    Each chunk's key is the one the installed LMCache computes for the same tokens and model;
    its bytes are LMCache's chunk tensor, with shape, dtype, format and token count as
    metadata, and its place in the prompt's chain (``lmcache-chunk-index``, ``lmcache-prev``)
    for ``gc``. ``batch_chunks`` (default: twice the store's ``max_inflight``) bounds how many
    chunk copies exist at once; ``engine_config`` is the reading engine's ``LMCacheEngineConfig``.
    ``if_absent`` writes with conditional puts (see ``write_chunks``).
    """
    source = chunk_source(kv, layout)
    num_tokens = len(tokens)
    if source.num_tokens != num_tokens:
        raise ConfigError(f"the KV cache covers {source.num_tokens} tokens but {num_tokens} tokens were given")
    chunks = chunk_keys(tokens, model=model, layout=layout, world_size=world_size, worker_id=worker_id,
                        save_unfull_chunk=save_unfull_chunk, key_layout=store.config.lmcache.key_layout,
                        engine_config=engine_config)
    return write_chunks(store, chunks, source, layout, batch_chunks=batch_chunks, progress=progress, if_absent=if_absent)


def write_chunks(
    store: Any, chunks: Sequence[ChunkKey], kv: Any, layout: KVLayout, *, present: Sequence[bool] | None = None,
    batch_chunks: int | None = None, progress: Progress | None = None, if_absent: bool = False,
) -> DumpReport:
    """Write the ``chunks`` (from ``chunk_keys``) of the KV cache ``kv`` that are not stored yet.

    ``present`` says which are already there (the caller checked, e.g. once for many prompts);
    without it one batched existence check runs first. ``if_absent`` writes with conditional
    puts where the backend has them: a put refused because another writer got there first
    counts as skipped, so concurrent dumps of shared prefixes write each chunk once.
    """
    source = kv if isinstance(kv, ChunkSource) else chunk_source(kv, layout)
    started = time.perf_counter()  # keys are computed: from here on it is copies and writes
    if present is None:
        try:
            present = store.exists_many([c.name for c in chunks])
        except BucketNotFound:
            # A file store's root is made by its first put; anywhere else that put fails just as loudly.
            present = [False] * len(chunks)
    todo = [c for c, there in zip(chunks, present) if not there]
    skipped = len(chunks) - len(todo)
    batch = batch_chunks or 2 * store.config.max_inflight
    conditional = if_absent and store.backend.capabilities.conditional_put
    written = nbytes = 0
    if progress:
        progress(skipped, 0)

    def put(item: tuple[ChunkKey, Any]) -> bool:
        chunk, tensor = item
        try:
            store.put(chunk.name, tensor, {**chunk_metadata(layout, chunk.num_tokens), **chunk.chain_metadata},
                      if_absent=conditional)
        except PreconditionFailed:
            return False  # another writer stored it between the check and this put
        return True

    for i in range(0, len(todo), batch):
        group = [(c, source.chunk(c.start, c.end)) for c in todo[i:i + batch]]
        stored = [c for (c, _), ok in zip(group, parallel_map(store, put, group)) if ok]
        written += len(stored)
        skipped += len(group) - len(stored)
        nbytes += sum(layout.chunk_bytes(c.num_tokens) for c in stored)
        if progress:
            progress(skipped + written, nbytes)
    return DumpReport(written, skipped, nbytes, time.perf_counter() - started)
