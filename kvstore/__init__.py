"""kvstore: LLM KV-cache chunks in object stores, one interface over every backend.

``kvstore.open(url, extra_config)`` gives a ``KVStore``; ``kvstore.resolve`` shows the
configuration it would use. Backend client libraries are imported only when a store is opened.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from kvstore.backends.base import NOT_LISTED, ObjectInfo
from kvstore.config import Credentials, StoreConfig, resolve
from kvstore.errors import (
    AuthError,
    BackendUnavailable,
    BucketNotFound,
    BufferTooSmall,
    ConfigError,
    IntegrityError,
    InvalidKey,
    KVStoreError,
    PreconditionFailed,
    StoreTimeout,
    StoreUnavailable,
)
from kvstore.store import KVStore

__version__ = "0.1.0"


def open(url: str | None, extra_config: Mapping[str, Any] | None = None) -> KVStore:
    """Open the store that ``url`` and ``extra_config`` describe (see ``resolve``)."""
    return open_config(resolve(url, extra_config))


def open_config(config: StoreConfig) -> KVStore:
    """Open a store from an already resolved ``StoreConfig``."""
    from kvstore.backends import backend_class
    from kvstore.layers import wrap

    _warn_if_plain_http(config)
    backend = backend_class(config.backend)(config)
    return KVStore(config, wrap(backend, config))


_warned_hosts: set[str] = set()


def _warn_if_plain_http(config: StoreConfig) -> None:
    """One warning per host when data would cross a network unencrypted."""
    from kvstore.config.profiles import is_loopback_or_private

    host = urlsplit(config.endpoint).hostname or ""
    if config.is_s3 and not config.tls and not is_loopback_or_private(host) and host not in _warned_hosts:
        _warned_hosts.add(host)
        logging.getLogger("kvstore").warning(
            "plain HTTP to %s: KV data and request signatures travel unencrypted (drop disable_tls, "
            "or use https:// in the endpoint)", host)


__all__ = [
    "AuthError", "BackendUnavailable", "BucketNotFound", "BufferTooSmall", "ConfigError", "Credentials",
    "IntegrityError", "InvalidKey", "KVStore", "KVStoreError", "NOT_LISTED", "ObjectInfo", "PreconditionFailed", "StoreConfig",
    "StoreTimeout", "StoreUnavailable", "open", "open_config", "resolve",
]
