"""kvstore's fsspec backend: s3fs for S3 profiles, and any other fsspec protocol (gs://, az://, ...)."""

from __future__ import annotations

from kvstore.backends.base import Capabilities
from kvstore.config.profiles import Profile
from kvstore.plugins import S3_PROFILES, BackendPlugin

# Protocols handed on when fsspec itself cannot be asked (it is a dependency, so rarely).
_FALLBACK = ("gs", "gcs", "az", "abfs", "abfss", "adl", "hdfs", "webhdfs", "oci", "oss", "sftp", "ftp", "smb", "hf")


def protocols() -> frozenset[str]:
    """Every protocol fsspec knows, without importing any of their implementations."""
    try:
        from fsspec.registry import known_implementations, registry
    except ImportError:
        return frozenset(_FALLBACK)
    return frozenset(known_implementations) | frozenset(registry)


PLUGIN = BackendPlugin(
    name="fsspec",
    load="kvstore_fsspec.backend:FsspecBackend",
    serves=(*S3_PROFILES, "file", "fsspec"),
    priority=10,
    capabilities=Capabilities(conditional_put=True),
    profiles=(Profile("fsspec", checksum="none", doc="Any other fsspec protocol (gs://, az://, ...)."),),
    schemes=protocols,
    distribution="kvcache-store-fsspec",
    doc="fsspec: s3fs (aiobotocore) for S3 profiles, fsspec.url_to_fs for every other protocol.",
)
