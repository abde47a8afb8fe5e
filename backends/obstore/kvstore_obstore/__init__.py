"""kvstore's obstore backend: S3 through Rust's object_store."""

from __future__ import annotations

from kvstore.backends.base import Capabilities
from kvstore.plugins import S3_PROFILES, BackendPlugin

PLUGIN = BackendPlugin(
    name="obstore",
    load="kvstore_obstore.backend:ObstoreBackend",
    serves=S3_PROFILES,
    priority=50,
    capabilities=Capabilities(conditional_put=True),
    distribution="kvcache-store-obstore",
    doc="obstore (Rust object_store): unsigned payloads, native batch delete, an HTTP(S) proxy.",
)
