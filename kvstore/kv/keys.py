"""Chunk keys and object names, computed by the installed LMCache itself.

LMCache chains a hash over each chunk of ``chunk_size`` tokens; rather than copy that
arithmetic (which depends on its config, on vLLM being importable, on MLA's world-size rule),
the keys come from LMCache's own ``ChunkedTokenDatabase``. Its default hash is Python's
builtin ``hash`` over ``(prefix_hash, tuple_of_token_ids, ())``; CPython does not randomise
the hash of integers and tuples, so these keys do not depend on PYTHONHASHSEED, but LMCache
asks every process sharing a cache to export ``PYTHONHASHSEED=0`` and so do we.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from kvstore.errors import BackendUnavailable
from kvstore.kv.layout import KVLayout
from kvstore.naming import chain_metadata, chunk_name, key_hash

_TORCH_DTYPE_OF_NAME = {"half": "float16", "float": "float32", "double": "float64"}


@dataclass(frozen=True)
class ChunkKey:
    """One chunk of a token sequence: its token range and the object it is stored under."""

    start: int
    end: int
    key: str  # CacheEngineKey.to_string()
    name: str  # the object name (relative to the store's prefix)
    index: int = 0  # the chunk's place in the prompt's chain
    prev_hash: str | None = None  # the hash field of the previous chunk's key

    @property
    def chain_metadata(self) -> dict[str, str]:
        return chain_metadata(self.index, self.prev_hash)

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def hash_seed() -> str | None:
    """The PYTHONHASHSEED this process was started with, or None when it was left random."""
    return os.environ.get("PYTHONHASHSEED")


def _lmcache() -> tuple[Any, Any, Any]:
    try:
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.token_database import ChunkedTokenDatabase
    except ImportError:
        raise BackendUnavailable("KV chunk keys", "lmcache", "lmcache") from None
    return LMCacheEngineConfig, LMCacheMetadata, ChunkedTokenDatabase


def lmcache_metadata(layout: KVLayout, *, model: str, world_size: int = 1, worker_id: int = 0) -> Any:
    """The ``LMCacheMetadata`` an engine serving ``model`` with this layout would have."""
    import torch

    _, LMCacheMetadata, _ = _lmcache()
    return LMCacheMetadata(
        model_name=model, world_size=world_size, local_world_size=world_size, worker_id=worker_id,
        local_worker_id=worker_id, kv_dtype=getattr(torch, _TORCH_DTYPE_OF_NAME.get(layout.dtype, layout.dtype)),
        kv_shape=layout.lmcache_kv_shape(), use_mla=layout.mla, chunk_size=layout.chunk_size,
    )


def lmcache_config(layout: KVLayout, *, save_unfull_chunk: bool = True, engine_config: Any = None, **overrides: Any) -> Any:
    """An ``LMCacheEngineConfig`` with this layout's chunk size: a copy of ``engine_config`` (the
    user's own, so its hash algorithm and every other key-shaping setting apply) or the defaults."""
    LMCacheEngineConfig, _, _ = _lmcache()
    if engine_config is None:
        return LMCacheEngineConfig.from_defaults(chunk_size=layout.chunk_size, save_unfull_chunk=save_unfull_chunk,
                                                 **overrides)
    config = copy.copy(engine_config)
    for name, value in {"chunk_size": layout.chunk_size, "save_unfull_chunk": save_unfull_chunk, **overrides}.items():
        setattr(config, name, value)
    return config


def chunk_keys(
    tokens: Sequence[int] | Any, *, model: str, layout: KVLayout, world_size: int = 1, worker_id: int = 0,
    save_unfull_chunk: bool = True, key_layout: str = "flat", engine_config: Any = None,
) -> list[ChunkKey]:
    """The chunks LMCache makes of ``tokens`` (a list of ids or a 1-D tensor), in order.

    ``save_unfull_chunk=False`` leaves out a short last chunk, as LMCache's default config does;
    the keys of full chunks are the same either way. Object names follow the LMCache adapter's
    naming in ``key_layout`` (a store's ``config.lmcache.key_layout``). ``engine_config`` is the
    ``LMCacheEngineConfig`` of the engine that will read the chunks, when there is one.
    """
    _, _, ChunkedTokenDatabase = _lmcache()
    if hasattr(tokens, "tolist"):
        tokens = cast(Any, tokens).reshape(-1).tolist()  # a tensor or an array
    tokens = [int(t) for t in tokens]
    db = ChunkedTokenDatabase(lmcache_config(layout, save_unfull_chunk=save_unfull_chunk, engine_config=engine_config),
                              lmcache_metadata(layout, model=model, world_size=world_size, worker_id=worker_id))
    out: list[ChunkKey] = []
    for index, (start, end, key) in enumerate(db.process_tokens(tokens=tokens)):
        text = key.to_string()
        out.append(ChunkKey(start, end, text, chunk_name(text, key_layout), index, key_hash(out[-1].key) if out else None))
    return out
