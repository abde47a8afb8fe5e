"""Object names for LMCache chunks, compatible with LMCache's own S3 code by default.

The LMCache adapter (``kvstore.lmcache``) and the offline tools (``kvstore.kv``) both name and
read chunks through this module, so what one writes the other finds. The layout a store uses is
its ``config.lmcache.key_layout`` (``kvstore_key_layout``).

- non-MP chunks (``CacheEngineKey``): ``key.to_string().replace("/", "_")``, the name LMCache's
  ``S3Connector`` gives the object (it percent-quotes the request path; the server decodes it).
- MP-mode chunks (``ObjectKey``): ``<model>@<kv_rank:08x>@<group:x>@<hash hex>[@<salt>]``, as
  LMCache's built-in S3 L2 adapter writes them (the model's ``/`` is kept).

The ``hashed`` layout puts ``<4 hex digits of sha256(name)>/`` in front, which spreads objects
over 65536 S3 prefixes (S3 scales request rates per prefix) at the price of names LMCache's own
connectors no longer find. Names too long for S3 become a digest under ``long/`` either way.

Pure string work: nothing here imports LMCache.
"""

from __future__ import annotations

import hashlib
from typing import Any

LAYOUTS = ("flat", "hashed")
# Object metadata written with every chunk (x-amz-meta-* on S3), read back to size short chunks.
META_SHAPES = "lmcache-shapes"
META_DTYPES = "lmcache-dtypes"
META_FMT = "lmcache-fmt"
META_TOKENS = "lmcache-tokens"
# Where a chunk sits in its prompt's hash chain, so that ``kv gc`` can evict from the tail: its
# index (0 for a prompt's first chunk) and its predecessor's chunk hash as spelled in the name.
META_CHUNK_INDEX = "lmcache-chunk-index"
META_PREV = "lmcache-prev"
HASH_CHARS = 4
# Object names stay well inside S3's 1024-byte limit, leaving room for the store's prefix.
MAX_CHUNK_NAME_BYTES = 768
LONG_DIR = "long/"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def apply_layout(name: str, layout: str = "flat") -> str:
    """Place an LMCache-style name in the chosen layout; overlong names become a digest."""
    if layout not in LAYOUTS:
        raise ValueError(f"key layout is one of {', '.join(LAYOUTS)}, got {layout!r}")
    if len(name.encode("utf-8")) > MAX_CHUNK_NAME_BYTES:
        name = LONG_DIR + _digest(name)
    if layout == "hashed":
        return f"{_digest(name)[:HASH_CHARS]}/{name}"
    return name


def strip_layout(name: str, layout: str = "flat") -> str:
    """The LMCache-style name inside an object name (inverse of ``apply_layout`` for short names)."""
    if layout == "hashed":
        head, sep, rest = name.partition("/")
        if sep and len(head) == HASH_CHARS:
            return rest
    return name


def chunk_name(key_string: str, layout: str = "flat") -> str:
    """Object name of a non-MP chunk, from ``CacheEngineKey.to_string()``."""
    return apply_layout(key_string.replace("/", "_"), layout)


def object_key_string(model_name: str, kv_rank: int, object_group_id: int, chunk_hash: bytes, cache_salt: str = "") -> str:
    """The MP-mode name of an ``ObjectKey``, field by field, as LMCache's S3 L2 adapter spells it."""
    base = f"{model_name}@{kv_rank:08x}@{object_group_id:x}@{chunk_hash.hex()}"
    return f"{base}@{cache_salt}" if cache_salt else base


def mp_object_name(key: Any, layout: str = "flat") -> str:
    """Object name of an MP-mode ``ObjectKey``."""
    return apply_layout(
        object_key_string(key.model_name, key.kv_rank, key.object_group_id, key.chunk_hash, key.cache_salt), layout
    )


def key_hash(key_string: str) -> str:
    """The chunk-hash field of ``CacheEngineKey.to_string()`` (``model@ws@worker@<hash>@dtype...``)."""
    return key_string.split("@")[3]


def chain_metadata(index: int | None, prev_hash: str | None) -> dict[str, str]:
    """``lmcache-chunk-index`` / ``lmcache-prev`` for what is known of a chunk's place in its chain."""
    out = {}
    if index is not None:
        out[META_CHUNK_INDEX] = str(index)
    if prev_hash is not None:
        out[META_PREV] = prev_hash
    return out
