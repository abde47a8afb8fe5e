"""What a resolved configuration is: ``StoreConfig``, its ``Credentials`` and the ``Secret`` strings.

Pure data: how a URL and extra_config become one of these is ``kvstore.config.resolve``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

from kvstore.config import keys as K
from kvstore.config.lmcache import LMCacheOptions
from kvstore.config.profiles import MiB, profile_named


class Secret(str):
    """A string that never shows itself in repr or str formatting of containers."""

    def __repr__(self) -> str:
        return "'***'"

    def reveal(self) -> str:
        return str.__str__(self)


@dataclass(frozen=True)
class Credentials:
    """Where credentials come from. The secret parts are ``Secret`` and never printed."""

    source: str  # "static" (extra_config), "env", "profile", "default-chain", "none"
    access_key_id: str | None = None
    secret_access_key: Secret | None = field(default=None, repr=False)
    session_token: Secret | None = field(default=None, repr=False)
    profile_name: str | None = None

    def __repr__(self) -> str:
        shown = f"source={self.source!r}"
        if self.access_key_id:
            shown += f", access_key_id={_mask(self.access_key_id)!r}, secret_access_key='***'"
        if self.session_token:
            shown += ", session_token='***'"
        if self.profile_name:
            shown += f", profile_name={self.profile_name!r}"
        return f"Credentials({shown})"

    __str__ = __repr__

    def describe(self) -> str:
        if self.source in ("static", "env"):
            return f"{self.source} key {_mask(self.access_key_id or '')}"
        if self.source == "profile":
            return f"shared profile {self.profile_name!r}"
        return self.source


def _mask(access_key_id: str) -> str:
    return access_key_id[:4] + "…" if len(access_key_id) > 4 else "…"


@dataclass(frozen=True)
class StoreConfig:
    """A validated, frozen store configuration. ``sources`` says where each field came from."""

    profile: str
    backend: str
    bucket: str = ""
    prefix: str = ""
    endpoint: str = ""  # what the client connects to: scheme://host[:port] (bucket in the host when virtual)
    base_endpoint: str = ""  # the service endpoint without the bucket (for clients that build the host themselves)
    region: str = ""
    addressing: str = ""
    tls: bool = True
    s3express: bool = False
    prefer_http2: bool = False
    io_threads: int = 0
    max_inflight: int = 32
    part_size: int = 8 * MiB
    timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    max_retries: int = 4
    checksum: str = "none"
    ca_bundle: str | None = None
    proxy_url: str | None = field(default=None, repr=False)  # may hold a password: shown redacted
    credentials: Credentials = field(default_factory=lambda: Credentials("none"))
    location: str = ""  # file root, memory name, or the whole URL of a profile a backend adds
    fsync: bool = False
    breaker_threshold: int = 5
    breaker_reset_s: float = 5.0
    ignored_keys: tuple[str, ...] = ()
    lmcache: LMCacheOptions = field(default_factory=LMCacheOptions)  # the keys only the LMCache side reads
    options: Mapping[str, Any] = field(default_factory=dict)  # the keys the chosen backend adds, by name
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_s3(self) -> bool:
        return profile_named(self.profile).is_s3

    @property
    def url(self) -> str:
        """A canonical URL for this store (no secrets)."""
        if self.is_s3:
            tail = f"/{self.prefix}" if self.prefix else ""
            return f"s3://{self.bucket}{tail}"
        if self.profile == "file":
            return f"file://{self.location}"
        if self.profile == "memory":
            return f"memory://{self.location}"
        return self.location

    def source_of(self, name: str) -> str:
        return self.sources.get(name, "default")

    def rows(self) -> list[tuple[str, str, str]]:
        """(field, shown value, source) for display; secrets redacted.

        The two groups of keys beyond the core's own get one row per key, named ``GROUP.NAME``:
        ``lmcache.FIELD`` and ``options.KEY`` (a key the backend adds).
        """
        out = []
        for f in fields(self):
            if f.name == "sources":
                continue
            value = getattr(self, f.name)
            if f.name == "options":
                for name, option in value.items():
                    shown = "***" if isinstance(option, Secret) else str(option)
                    out.append((f"options.{name}", shown, self.source_of(f"options.{name}")))
                continue
            if isinstance(value, LMCacheOptions):
                out += [(f"lmcache.{name}", str(v), self.source_of(f"lmcache.{name}")) for name, v in value.items()]
                continue
            if isinstance(value, Credentials):
                shown = value.describe()
            elif isinstance(value, tuple):
                shown = ", ".join(value)
            elif f.name == "proxy_url" and value:
                shown = K.redact_url(value)
            else:
                shown = str(value)
            out.append((f.name, shown, self.source_of(f.name)))
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, secrets redacted."""
        result: dict[str, Any] = {}
        for name, shown, source in self.rows():
            group, dot, sub = name.partition(".")
            if dot:  # a row of options or lmcache
                value = self.options[sub] if group == "options" else getattr(self.lmcache, sub)
                result[name] = {"value": shown if isinstance(value, Secret) else value, "source": source}
                continue
            value = getattr(self, name)
            if name == "proxy_url":
                value = shown if value else None
            elif isinstance(value, Credentials):
                value = {"source": value.source, "access_key_id": _mask(value.access_key_id) if value.access_key_id else None,
                         "profile_name": value.profile_name}
            result[name] = {"value": list(value) if isinstance(value, tuple) else value, "source": source}
        return result

    def with_overrides(self, **changes: Any) -> StoreConfig:
        """A copy with some fields changed (sources marked as overridden)."""
        sources = dict(self.sources)
        sources.update({name: "override" for name in changes})
        if "lmcache" in changes:  # its rows are one per field
            sources.update({f"lmcache.{name}": "override" for name, _ in changes["lmcache"].items()})
        return replace(self, **changes, sources=MappingProxyType(sources))
