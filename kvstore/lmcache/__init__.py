"""LMCache integration: a remote-storage plugin, a storage plugin and an MP-mode L2 adapter.

The classes import LMCache (and torch) only when first used, so ``import kvstore.lmcache`` and the
config helpers stay light. Chunk names are ``kvstore.naming``, shared with ``kvstore.kv``.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "KVStoreConnectorAdapter": "kvstore.lmcache.connector",
    "KVStoreConnector": "kvstore.lmcache.connector",
    "KVStoreStoragePlugin": "kvstore.lmcache.storage_plugin",
    "KVStoreL2Adapter": "kvstore.lmcache.l2",
    "KVStoreL2AdapterConfig": "kvstore.lmcache.l2",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvstore.lmcache' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_LAZY)
