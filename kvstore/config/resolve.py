"""``resolve(url, extra_config) -> StoreConfig``: the one place where configuration is decided.

Precedence, highest first: the URL, extra_config, the environment (``AWS_*``), the profile's
defaults. ``kvstore_profile`` / ``kvstore_backend`` override detection. Pure: reads
``os.environ`` (or the mapping given) and nothing else. What it builds is ``config.model``; the
keys only the LMCache side reads become its ``config.lmcache`` (``LMCacheOptions``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from kvstore.config import keys as K
from kvstore.config.lmcache import LMCacheOptions
from kvstore.config.model import Credentials, Secret, StoreConfig
from kvstore.config.profiles import (
    AZ_REGIONS,
    Detected,
    MiB,
    Profile,
    detect,
    detect_endpoint_host,
    express_zone,
    profile_named,
    profile_names,
    s3express_host,
    valid_bucket,
)
from kvstore.errors import ConfigError

DEFAULTS = {
    "io_threads": 0,
    "max_inflight": 32,
    "timeout_s": 30.0,
    "connect_timeout_s": 5.0,
    "max_retries": 4,
    "fsync": False,
    "breaker_threshold": 5,
    "breaker_reset_s": 5.0,
    "region_fallback": "us-east-1",
}
MAX_PART = 5 * 1024 * MiB


class _Builder:
    """Collects field values with their sources and reports conflicts."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.sources: dict[str, str] = {}

    def set(self, name: str, value: Any, source: str, *, conflict_with_url: bool = True) -> None:
        if name in self.values and self.values[name] != value:
            old = self.sources[name]
            if old == "url" and not conflict_with_url:
                return
            raise ConfigError(
                f"conflicting values for {name}: {self.values[name]!r} ({old}) and {value!r} ({source})",
                key=source.partition(":")[2] or name,
            )
        self.values[name] = value
        self.sources.setdefault(name, source)

    def default(self, name: str, value: Any, source: str) -> None:
        if name not in self.values:
            self.values[name] = value
            self.sources[name] = source


def _parse_extra(extra_config: Mapping[str, Any] | None) -> tuple[dict[str, Any], tuple[str, ...]]:
    if extra_config is None:
        return {}, ()
    if not isinstance(extra_config, Mapping):
        raise ConfigError(f"extra_config must be a mapping, got {type(extra_config).__name__}")
    parsed: dict[str, Any] = {}
    ignored = []
    for name, raw in extra_config.items():
        key = K.classify(name, raw)
        if key is None:
            ignored.append(str(name))
            continue
        if raw is None:
            continue
        try:
            parsed[name] = key.parse(raw)
            continue
        except ValueError as exc:
            if not key.secret:
                raise ConfigError(f"extra_config[{name!r}]: {exc}", key=name) from None
        # The parsers quote what they got, and a mistyped secret is still a secret: raised here,
        # outside the handler, the error keeps no trace of the parser's message.
        raise ConfigError(f"extra_config[{name!r}]: expected a {key.kind}, got a {type(raw).__name__} (value not shown)",
                          key=name)
    return parsed, tuple(sorted(ignored))


def _url_from(url: str | None, extra: dict[str, Any]) -> tuple[Detected, str]:
    given = [(src, val) for src, val in (("url", url), ("extra_config:kvstore_url", extra.get("kvstore_url"))) if val]
    if "s3_endpoint" in extra:
        given.append(("extra_config:s3_endpoint", extra["s3_endpoint"]))
    if not given:
        raise ConfigError("a store URL is required (the url argument, kvstore_url or s3_endpoint)")
    detected = [(src, detect_endpoint_host(v) if src.endswith("s3_endpoint") else detect(v)) for src, v in given]
    first_src, first = detected[0]
    shown = dict((src, K.redact_url(str(v))) for src, v in given)
    for src, other in detected[1:]:
        if (other.profile, other.bucket, other.prefix, other.endpoint, other.location) != (
            first.profile, first.bucket, first.prefix, first.endpoint, first.location
        ):
            raise ConfigError(f"{src} ({shown[src]}) names another store than {first_src} ({shown[first_src]}): "
                              f"give one of them", key=src.partition(":")[2])
    return first, first_src


def resolve(url: str | None, extra_config: Mapping[str, Any] | None = None, *, env: Mapping[str, str] | None = None) -> StoreConfig:
    """Turn an LMCache-style URL plus extra_config into a validated, frozen ``StoreConfig``."""
    env = os.environ if env is None else env
    extra, ignored = _parse_extra(extra_config)
    detected, url_source = _url_from(url, extra)
    if detected.profile == "file":
        detected = replace(detected, location=os.path.abspath(os.path.expanduser(detected.location)))
    b = _Builder()
    for name in ("bucket", "prefix", "endpoint", "region", "addressing", "tls", "location"):
        value = getattr(detected, name)
        if value not in (None, "") and (name in detected.fields_from_url or name in ("bucket", "prefix", "location")):
            b.set(name, value, url_source)

    profile_name = detected.profile
    if "kvstore_profile" in extra:
        profile_name = extra["kvstore_profile"]
        b.sources["profile"] = "extra_config:kvstore_profile"
        if profile_name not in profile_names():
            raise ConfigError(f"kvstore_profile: no profile {profile_name!r} (profiles: {', '.join(profile_names())})",
                              key="kvstore_profile")
        forced, named = profile_named(profile_name), profile_named(detected.profile)
        if profile_name != detected.profile and not (forced.is_s3 and named.is_s3):
            # An S3 profile may refine an s3:// URL (minio, coreweave); nothing may turn one store kind into another.
            kind = "an S3" if named.is_s3 else f"the {detected.profile}"
            raise ConfigError(f"kvstore_profile {profile_name!r} does not fit {kind} store "
                              f"{K.redact_url(str(url or extra.get('kvstore_url') or extra.get('s3_endpoint')))}: "
                              f"drop kvstore_profile or give a URL of that kind", key="kvstore_profile")
    b.values["profile"] = profile_name
    b.sources.setdefault("profile", url_source)

    # The endpoint given apart from the URL (self-hosted S3) decides the profile when the URL did not.
    if "s3_endpoint_url" in extra:
        _apply_endpoint_url(b, extra["s3_endpoint_url"], "extra_config:s3_endpoint_url", detected)
    elif "endpoint" not in b.values and profile_named(profile_name).is_s3:
        env_name, env_endpoint = _env_endpoint(env)
        if env_endpoint:
            try:
                checked = K.parse_endpoint_url(env_endpoint, env_name)
            except ValueError as exc:
                raise ConfigError(str(exc), key=env_name) from None
            _apply_endpoint_url(b, checked, f"env:{env_name}", detected)
    profile = profile_named(b.values["profile"])

    options: dict[str, Any] = {}
    for name, value in extra.items():
        key = K.key_named(name)
        assert key is not None  # _parse_extra kept only known keys
        if name not in K.BY_NAME:  # a key a backend adds
            options[name] = Secret(value) if key.secret and isinstance(value, str) else value
            b.sources[f"options.{name}"] = f"extra_config:{name}"
            continue
        if key.field in (None, "credentials", "profile", "endpoint"):
            continue
        source = f"extra_config:{name}"
        if key.field == "tls":
            b.set("tls", not value, source)
        elif key.field == "prefix":
            b.set("prefix", value.strip("/"), source)
        elif key.field == "lmcache.capacity_bytes":
            b.set(key.field, int(value * 1024**3), source)
        else:
            b.set(key.field, value, source)

    region_env = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region_env and profile.is_s3:
        b.default("region", region_env, "env:AWS_REGION")

    if detected.tls is not None:
        b.default("tls", detected.tls, url_source)
    _apply_profile_defaults(b, profile)
    credentials, cred_source = _credentials(extra, env, profile.is_s3)
    b.values["credentials"] = credentials
    b.sources["credentials"] = cred_source
    b.values["ignored_keys"] = ignored
    if ignored:
        b.sources["ignored_keys"] = "extra_config"
    _validate(b.values, profile)
    _validate_options(options, b.values["backend"])
    b.values["options"] = MappingProxyType(options)
    return StoreConfig(**b.values, sources=MappingProxyType(dict(b.sources)))


def _validate_options(options: Mapping[str, Any], backend: str) -> None:
    """A key a backend adds applies to that backend only: set with another, it would do nothing."""
    from kvstore import plugins

    added = plugins.added_keys()
    for name in options:
        owner = added[name][1].name
        if owner != backend:
            raise ConfigError(f"{name} is a setting of the {owner} backend, but this store uses the {backend} backend",
                              key=name)


def _env_endpoint(env: Mapping[str, str]) -> tuple[str, str | None]:
    """The AWS SDKs' endpoint variables: the S3-specific one first; none when the SDKs are told to ignore them."""
    if env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").strip().lower() == "true":
        return "", None
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if env.get(name, "").strip():
            return name, env[name]
    return "", None


def _apply_endpoint_url(b: _Builder, endpoint_url: str, source: str, detected: Detected) -> None:
    """``endpoint_url`` has passed ``keys.parse_endpoint_url``."""
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint_url)
    parts = parts._replace(scheme=parts.scheme.lower())
    if "endpoint" in b.values and b.values["endpoint"] != parts.netloc.lower():
        raise ConfigError(f"the URL names host {b.values['endpoint']!r} but {source} names {endpoint_url!r}",
                          key=source.partition(":")[2])
    b.values["endpoint"] = parts.netloc.lower()
    b.sources["endpoint"] = source
    b.set("tls", parts.scheme == "https", source, conflict_with_url=False)
    host = (parts.hostname or "").lower()  # never empty: parse_endpoint_url requires a host
    if b.sources["profile"] == "extra_config:kvstore_profile":  # forced: the host does not decide
        return
    if host.endswith(("cwlota.com", "cwobject.com")):
        b.values["profile"] = "coreweave"
    elif host.endswith("amazonaws.com"):
        b.values["profile"] = "aws"
    elif detected.profile == "aws":
        b.values["profile"] = "s3"
        b.values.pop("addressing", None)
    b.sources["profile"] = source


_S3_ONLY = ("bucket", "endpoint", "region", "addressing")


def _apply_profile_defaults(b: _Builder, profile: Profile) -> None:
    from kvstore import plugins

    src = f"profile:{profile.name}"
    if "backend" not in b.values:
        chosen = plugins.default_backend(profile.name)
        b.default("backend", chosen.name, f"{src} (its highest-priority installed backend)")
    # A setting for another kind of store would be dropped in silence: name it instead.
    for name in (_S3_ONLY if not profile.is_s3 else ()) + (("fsync",) if profile.name != "file" else ()):
        source = b.sources.get(name, "")
        if source.startswith("extra_config:"):
            key = source.partition(":")[2]
            raise ConfigError(f"{key} does not apply to the {profile.name} profile: drop it", key=key)
    if not profile.is_s3:
        for name in _S3_ONLY:
            b.values.pop(name, None)
            b.sources.pop(name, None)
        b.default("tls", False, src)
    for name in ("io_threads", "max_inflight", "timeout_s", "connect_timeout_s", "max_retries", "fsync",
                 "breaker_threshold", "breaker_reset_s"):
        b.default(name, DEFAULTS[name], "default")
    b.default("checksum", profile.checksum, src)
    b.default("part_size", profile.part_size, src)
    if not profile.is_s3:
        return
    b.default("addressing", profile.addressing, src)
    b.default("tls", True, src)
    b.default("s3express", profile.name == "s3express", src)
    b.default("prefer_http2", profile.prefer_http2, src)
    if b.values["prefer_http2"] and not b.values["tls"] and b.sources["prefer_http2"].startswith("extra_config:"):
        # HTTP/2 is negotiated in the TLS handshake (ALPN): over plain HTTP the setting would do nothing.
        raise ConfigError("s3_prefer_http2 needs TLS, and this endpoint is plain HTTP: drop one of them",
                          key=b.sources["prefer_http2"].partition(":")[2])
    bucket = b.values.get("bucket", "")
    if profile.name == "s3express":
        _express_region(b, bucket)
    if profile.name in ("aws", "s3express") and "region" not in b.values:
        raise ConfigError(f"s3_region is required for {profile.name} bucket {bucket!r} (or put it in the host, "
                          f"or set AWS_REGION)", key="s3_region")
    b.default("region", DEFAULTS["region_fallback"], "default")
    if "endpoint" not in b.values:
        b.default("endpoint", _default_host(profile.name, bucket, b.values["region"]), src)
    b.sources["base_endpoint"] = b.sources["endpoint"]


def _express_region(b: _Builder, bucket: str) -> None:
    """The region a directory bucket's zone belongs to: a default, and a conflict with any other."""
    zone = express_zone(bucket)
    zone_region = AZ_REGIONS.get(zone.rsplit("-", 1)[0]) if zone else None
    if zone_region is None:
        return
    region, source = b.values.get("region"), b.sources.get("region", "")
    if region is None or source.startswith("env:"):
        # The zone is part of the URL, and the URL outranks the environment.
        b.values["region"] = zone_region
        b.sources["region"] = "url:availability zone"
    elif region != zone_region:
        raise ConfigError(f"S3 Express bucket {bucket!r} is in zone {zone} of {zone_region}, but the region is "
                          f"{region!r} ({source})", key=source.partition(":")[2] or "s3_region")


def _default_host(profile: str, bucket: str, region: str) -> str:
    if profile == "s3express":
        zone = express_zone(bucket)
        if not zone:
            raise ConfigError(f"S3 Express bucket names look like NAME--AZID--x-s3, got {bucket!r}")
        return s3express_host(zone, region)
    if profile == "aws":
        return f"s3.{region}.amazonaws.com"
    raise ConfigError(f"the {profile} profile needs an endpoint: s3_endpoint_url or a host:port in the URL",
                      key="s3_endpoint_url")


def _credentials(extra: dict[str, Any], env: Mapping[str, str], is_s3: bool) -> tuple[Credentials, str]:
    if not is_s3:
        return Credentials("none"), "default"
    ak, sk, token = extra.get("aws_access_key_id"), extra.get("aws_secret_access_key"), extra.get("aws_session_token")
    if ak or sk:
        if not (ak and sk):
            missing = "aws_secret_access_key" if ak else "aws_access_key_id"
            raise ConfigError(f"{missing} is required with {'aws_access_key_id' if ak else 'aws_secret_access_key'}",
                              key=missing)
        return Credentials("static", ak, Secret(sk), Secret(token) if token else None), "extra_config:aws_access_key_id"
    if token:
        raise ConfigError("aws_session_token needs aws_access_key_id and aws_secret_access_key", key="aws_session_token")
    if "aws_profile" in extra:
        return Credentials("profile", profile_name=extra["aws_profile"]), "extra_config:aws_profile"
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        token = env.get("AWS_SESSION_TOKEN")
        return (Credentials("env", env["AWS_ACCESS_KEY_ID"], Secret(env["AWS_SECRET_ACCESS_KEY"]),
                            Secret(token) if token else None), "env:AWS_ACCESS_KEY_ID")
    if env.get("AWS_PROFILE"):
        return Credentials("profile", profile_name=env["AWS_PROFILE"]), "env:AWS_PROFILE"
    return Credentials("default-chain"), "default"


def _lmcache_options(values: dict[str, Any]) -> LMCacheOptions:
    """The values collected as ``lmcache.FIELD`` as one ``LMCacheOptions``, which checks them; the
    rest take its defaults (their source stays "default")."""
    group = [name for name in values if name.startswith("lmcache.")]
    return LMCacheOptions(**{name.removeprefix("lmcache."): values.pop(name) for name in group})


def _validate(values: dict[str, Any], profile: Profile) -> None:
    from kvstore import plugins

    backend = values["backend"]
    chosen = plugins.plugin(backend)
    allowed = [p.name for p in plugins.serving(profile.name)]
    if backend not in allowed:
        raise ConfigError(f"backend {backend!r} cannot serve the {profile.name} profile (use one of {', '.join(allowed)})",
                          key="kvstore_backend")
    if not 0 <= values["io_threads"] <= K.MAX_IO_THREADS:
        raise ConfigError(f"s3_num_io_threads must be between 0 (one per CPU) and {K.MAX_IO_THREADS}, got "
                          f"{values['io_threads']}", key="s3_num_io_threads")
    for name, low in (("max_inflight", 1), ("max_retries", 0), ("breaker_threshold", 0)):
        if values[name] < low or values[name] > 100_000:
            raise ConfigError(f"{name} must be between {low} and 100000, got {values[name]}", key=name)
    for name in ("timeout_s", "connect_timeout_s", "breaker_reset_s"):
        if not 0 < values[name] <= 86_400:
            raise ConfigError(f"{name} must be a positive number of seconds, got {values[name]}", key=name)
    values["lmcache"] = _lmcache_options(values)
    if not profile.is_s3:
        for name, key in (("s3express", "s3_enable_s3express"), ("proxy_url", "s3_proxy_url")):
            if values.get(name):
                raise ConfigError(f"{key} does not apply to the {profile.name} profile", key=key)
        return
    if values.get("proxy_url") and not chosen.proxy:
        able = [p.name for p in plugins.serving(profile.name) if p.proxy]
        raise ConfigError(f"s3_proxy_url: the {backend} backend cannot go through a proxy; set kvstore_backend to "
                          f"one that can ({', '.join(able) or 'none is installed'})", key="s3_proxy_url")
    bucket = values.get("bucket", "")
    if not valid_bucket(bucket):
        raise ConfigError(f"invalid bucket name {bucket!r}: 3-63 characters, letters, digits, '.', '-'")
    if values["addressing"] not in profile.allowed_addressing:
        raise ConfigError(f"the {profile.name} profile only supports {'/'.join(profile.allowed_addressing)} addressing",
                          key="s3_addressing_style")
    if profile.tls_only and not values["tls"]:
        raise ConfigError(f"the {profile.name} profile is HTTPS only: drop disable_tls", key="disable_tls")
    if values["s3express"] and not express_zone(bucket):
        raise ConfigError(f"s3_enable_s3express needs a directory bucket named NAME--AZID--x-s3, got {bucket!r}",
                          key="s3_enable_s3express")
    if profile.name == "s3express" and not values["s3express"]:
        raise ConfigError("S3 Express buckets need s3_enable_s3express (session auth): it cannot be false here",
                          key="s3_enable_s3express")
    if not profile.min_part_size <= values["part_size"] <= MAX_PART:
        raise ConfigError(f"s3_part_size must be between {profile.min_part_size // MiB} MiB ({profile.name}) and 5 GiB, "
                          f"got {values['part_size']}", key="s3_part_size")
    # One place turns the service host into what clients connect to: scheme from TLS, bucket in the
    # host for virtual-hosted addressing.
    scheme = "https" if values["tls"] else "http"
    values["base_endpoint"] = f"{scheme}://{values['endpoint']}"
    if values["addressing"] == "virtual":
        values["endpoint"] = f"{scheme}://{bucket}.{values['endpoint']}"
    else:
        values["endpoint"] = values["base_endpoint"]
