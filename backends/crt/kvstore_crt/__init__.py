"""kvstore's awscrt backend: the default client of every S3 profile (zero-copy, part by part)."""

from __future__ import annotations

from kvstore.backends.base import Capabilities
from kvstore.plugins import S3_PROFILES, BackendPlugin

PLUGIN = BackendPlugin(
    name="crt",
    load="kvstore_crt.backend:CrtBackend",
    serves=S3_PROFILES,
    priority=100,
    capabilities=Capabilities(conditional_put=True),
    proxy=False,  # awscrt's S3 client has no proxy support
    distribution="kvcache-store-crt",
    doc="The AWS CRT S3 client (awscrt): multipart uploads and ranged reads straight from and into the caller's buffer.",
)
