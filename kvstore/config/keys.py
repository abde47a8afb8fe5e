"""The table of every extra_config key kvstore understands.

One table drives validation, did-you-mean suggestions, provenance in ``kvstore resolve`` and the
generated configuration reference (docs/configuration.md). Values arrive as YAML gives them, so
every parser accepts strings ("True", "64", "16MiB") as well as native values.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvstore.errors import ConfigError
from kvstore.naming import LAYOUTS

# LMCache's documented CoreWeave config asks for 320; far above that only costs OS threads (2,000
# asked made 4,013), so a bigger value is a typo or a misunderstanding, not a tuning.
MAX_IO_THREADS = 512

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "mi": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
          "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4}


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ValueError(f"expected an integer, got {value!r}")


def parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    else:
        raise ValueError(f"expected a number, got {value!r}")
    if result != result or result in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {value!r}")
    return result


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as "8MiB", "16 MB" or "1048576"."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match and (match.group(2) or "").lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    raise ValueError(f"expected a size such as 8388608 or '8MiB', got {value!r}")


def parse_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {value!r}")


def redact_url(url: str) -> str:
    """``url`` with everything before its last ``@`` (the user and password) replaced by ``***``.

    The last ``@``, scheme or not: a password with an unencoded ``/`` would otherwise end the
    authority early, and ``user:password@host`` without a scheme is a common slip.
    """
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme = head.split("://", 1)[0] + "://" if "://" in head else ""
    return f"{scheme}***@{tail}"


def _url_error(name: str, shape: str, text: str) -> ValueError:
    return ValueError(f"{name}: expected {shape}, got {redact_url(text)!r}")


def parse_endpoint_url(value: Any, name: str = "s3_endpoint_url") -> str:
    """``scheme://host[:port]`` of a self-hosted S3 endpoint; userinfo is refused like in store URLs."""
    from urllib.parse import urlsplit

    text = parse_str(value).strip()
    if "@" in text:
        # A password in an endpoint ends up in logs and generated configs: refuse it, as in s3:// URLs.
        raise ValueError(f"{name}: credentials in the endpoint URL are not accepted ({redact_url(text)!r}): "
                         f"use aws_access_key_id / aws_secret_access_key")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise _url_error(name, "http(s)://host[:port] with a port between 0 and 65535", text) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _url_error(name, "http(s)://host[:port]", text)
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise _url_error(name, "http(s)://host[:port] without a path (put the bucket in the URL)", text)
    return text


def parse_proxy_url(value: Any) -> str:
    from urllib.parse import urlsplit

    text = parse_str(value).strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") \
            or parts.query or parts.fragment:
        raise ValueError(f"expected http(s)://[user:password@]host[:port], got {redact_url(text)!r}")
    return text


def parse_name(value: Any) -> str:
    """A profile or backend name, checked against what is installed when the config is resolved."""
    text = parse_str(value).strip().lower()
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", text):
        raise ValueError(f"expected a name (letters, digits, '_' or '-'), got {value!r}")
    return text


def choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = parse_str(value).strip().lower()
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return text

    parse.__name__ = "one of " + "|".join(options)
    return parse


@dataclass(frozen=True)
class Key:
    """One accepted extra_config key."""

    name: str
    # The StoreConfig field it sets ("lmcache.NAME": a field of its LMCacheOptions); None for keys
    # that only steer detection.
    field: str | None
    parse: Callable[[Any], Any]
    doc: str
    kind: str  # type shown in the reference
    origin: str  # who defined it: "lmcache", "lmcache-legacy", "lmcache-mp", "kvstore"
    secret: bool = False
    legacy_of: str | None = None  # the current key this older spelling maps to


KEYS: tuple[Key, ...] = (
    # LMCache's S3 backend, current generation (s3_adapter.py, docs since Nov 2025).
    Key("s3_region", "region", parse_str, "Region to sign requests for. Taken from the host when the URL names one.", "str", "lmcache"),
    Key("s3_num_io_threads", "io_threads", parse_int, f"Event-loop threads of the CRT client (0: one per CPU, between 4 and 16; at most {MAX_IO_THREADS}; see docs/benchmarks.md).", "int", "lmcache"),
    Key("s3_prefer_http2", "prefer_http2", parse_bool, "Offer HTTP/2 through ALPN (TLS only).", "bool", "lmcache"),
    Key("s3_enable_s3express", "s3express", parse_bool, "Sign with S3 Express sessions (CreateSession).", "bool", "lmcache"),
    Key("disable_tls", "tls", parse_bool, "Plain HTTP instead of HTTPS (stored inverted as `tls`).", "bool", "lmcache"),
    Key("aws_access_key_id", "credentials", parse_str, "Static access key id; else the AWS default chain.", "str", "lmcache", secret=True),
    Key("aws_secret_access_key", "credentials", parse_str, "Static secret key; else the AWS default chain.", "str", "lmcache", secret=True),
    Key("save_chunk_meta", "lmcache.save_chunk_meta", parse_bool, "LMCache's per-chunk RemoteMetadata header. kvstore keeps object bytes raw and carries shape/dtype as object metadata instead.", "bool", "lmcache"),
    Key("blocking_timeout_secs", "timeout_s", parse_float, "Deadline of one operation, retries included.", "float", "lmcache"),
    # LMCache's first documented generation (Aug-Oct 2025).
    Key("s3_max_io_concurrency", "io_threads", parse_int, "Older name of s3_num_io_threads.", "int", "lmcache-legacy", legacy_of="s3_num_io_threads"),
    Key("s3_max_inflight_reqs", "max_inflight", parse_int, "Older name of kvstore_max_inflight.", "int", "lmcache-legacy", legacy_of="kvstore_max_inflight"),
    Key("s3_file_prefix", "prefix", parse_str, "Older way to set the object prefix; prefer the URL path.", "str", "lmcache-legacy"),
    # LMCache MP-mode L2 adapter spec ("type": "s3").
    Key("s3_endpoint", None, parse_str, "MP-mode bucket URL: s3://bucket or the bare host form.", "str", "lmcache-mp"),
    Key("max_capacity_gb", "lmcache.capacity_bytes", parse_float, "Capacity reported by the L2 adapter's get_usage (0: untracked).", "float", "lmcache-mp"),
    # kvstore's own.
    Key("kvstore_url", None, parse_str, "The store URL when it travels inside extra_config (LMCache plugins).", "str", "kvstore"),
    Key("kvstore_profile", "profile", parse_name, "Force a profile instead of detecting it from the URL (aws, s3express, coreweave, minio, s3, file, memory, or one an installed backend adds).", "str", "kvstore"),
    Key("kvstore_backend", "backend", parse_name, "Force a backend instead of the profile's default (an installed one: `kvstore resolve --backends`).", "str", "kvstore"),
    Key("s3_endpoint_url", "endpoint", parse_endpoint_url, "Full http(s)://host[:port] to connect to (self-hosted S3); no user:password. `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` set it from the environment.", "str", "kvstore"),
    Key("s3_addressing_style", "addressing", choice("virtual", "path"), "Virtual-hosted (bucket in the host) or path-style requests.", "str", "kvstore"),
    Key("s3_ca_bundle", "ca_bundle", parse_str, "PEM file of CA certificates to trust for TLS.", "str", "kvstore"),
    Key("s3_proxy_url", "proxy_url", parse_proxy_url, "HTTP(S) proxy for every request: http://[user:password@]host:port (backends that can: `kvstore resolve --backends`; awscrt has no proxy support).", "str", "kvstore"),
    Key("s3_part_size", "part_size", parse_size, "Multipart and ranged-GET part size.", "size", "kvstore"),
    Key("aws_session_token", "credentials", parse_str, "Session token that goes with static keys.", "str", "kvstore", secret=True),
    Key("aws_profile", "credentials", parse_str, "Named profile of the shared AWS config files.", "str", "kvstore"),
    Key("kvstore_max_inflight", "max_inflight", parse_int, "Most requests in flight per store; larger batches queue.", "int", "kvstore"),
    Key("kvstore_timeout_s", "timeout_s", parse_float, "Deadline of one operation, retries included.", "float", "kvstore"),
    Key("kvstore_connect_timeout_s", "connect_timeout_s", parse_float, "TCP/TLS connect timeout.", "float", "kvstore"),
    Key("kvstore_max_retries", "max_retries", parse_int, "Retries of an idempotent operation after a transient failure.", "int", "kvstore"),
    Key("kvstore_checksum", "checksum", choice("crc32c", "none"), "End-to-end checksum stored with each object and checked on read.", "str", "kvstore"),
    Key("kvstore_key_layout", "lmcache.key_layout", choice(*LAYOUTS), "LMCache object names as LMCache writes them, or behind a short hash prefix.", "str", "kvstore"),
    Key("kvstore_fsync", "fsync", parse_bool, "file store: fsync each object before it becomes visible.", "bool", "kvstore"),
    Key("kvstore_breaker_threshold", "breaker_threshold", parse_int, "Consecutive connection failures that open the circuit breaker (0: off).", "int", "kvstore"),
    Key("kvstore_breaker_reset_s", "breaker_reset_s", parse_float, "Seconds an open breaker waits before letting one probe through.", "float", "kvstore"),
)

BY_NAME: dict[str, Key] = {key.name: key for key in KEYS}


def key_named(name: str) -> Key | None:
    """The core's key, or one an installed backend adds (named ``kvstore_BACKEND_...``)."""
    key = BY_NAME.get(name)
    if key is not None or not name.startswith("kvstore_"):
        return key
    from kvstore import plugins

    added = plugins.added_keys().get(name)
    return added[0] if added else None


def known_names() -> list[str]:
    from kvstore import plugins

    return [*BY_NAME, *plugins.added_keys()]

# LMCache puts keys for other parts of itself into the same dict; they are not ours to judge.
FOREIGN_PREFIXES = ("remote_storage_plugin.", "storage_plugin.", "l2_adapter.", "lmcache.")
# Keys with these prefixes are storage settings: an unknown one is a mistake, never ignored.
OWN_PREFIXES = ("s3_", "kvstore_", "aws_")


# Store settings as boto3, obstore, s3fs and MinIO spell them. Ignoring one would send the data
# somewhere else (``endpoint`` ignored means AWS), so each is an error that names kvstore's key.
FOREIGN_KEYS: dict[str, str] = {
    **dict.fromkeys(("endpoint", "endpoint_url", "aws_endpoint", "aws_endpoint_url", "aws_endpoint_url_s3",
                     "s3_endpoint_uri", "host", "client_kwargs"), "s3_endpoint_url"),
    **dict.fromkeys(("access_key", "access_key_id", "aws_access_key", "key"), "aws_access_key_id"),
    **dict.fromkeys(("secret_key", "secret_access_key", "aws_secret_key", "secret"), "aws_secret_access_key"),
    **dict.fromkeys(("session_token", "token", "aws_token", "security_token", "aws_security_token"), "aws_session_token"),
    **dict.fromkeys(("region", "region_name", "aws_region", "aws_default_region", "s3_region_name"), "s3_region"),
    **dict.fromkeys(("bucket", "bucket_name", "aws_bucket", "aws_bucket_name", "s3_bucket", "prefix", "s3_prefix",
                     "url", "remote_url"), "kvstore_url"),
    **dict.fromkeys(("secure", "use_ssl", "allow_http", "aws_allow_http", "s3_use_ssl"), "disable_tls"),
    **dict.fromkeys(("addressing_style", "force_path_style", "s3_force_path_style", "virtual_hosted_style_request",
                     "aws_virtual_hosted_style_request", "s3_virtual_hosting"), "s3_addressing_style"),
    **dict.fromkeys(("proxy", "proxy_url", "proxies", "aws_proxy_url", "https_proxy", "http_proxy"), "s3_proxy_url"),
    **dict.fromkeys(("verify", "ca_bundle", "aws_ca_bundle"), "s3_ca_bundle"),
    **dict.fromkeys(("profile", "profile_name"), "aws_profile"),
    **dict.fromkeys(("s3_express", "aws_s3_express"), "s3_enable_s3express"),
}
_FOREIGN_HINTS = {
    "s3_endpoint_url": "use s3_endpoint_url: http(s)://host[:port], or host:port in the URL (s3://host:port/bucket)",
    "kvstore_url": "the bucket and prefix belong in the store URL, s3://BUCKET/PREFIX (remote_url or kvstore_url)",
    "disable_tls": "use disable_tls: true for plain HTTP, or an http:// endpoint",
    "s3_addressing_style": "use s3_addressing_style: path or virtual",
    "aws_profile": "use aws_profile for a profile of the shared AWS config files, kvstore_profile for the kind of store",
}


def is_secret(name: str, value: Any) -> bool:
    """Whether this extra_config entry must never be written out: a secret key, or a URL with a password."""
    key = key_named(name)
    if key is not None and key.secret:
        return True
    target = FOREIGN_KEYS.get(name)
    if target is not None and BY_NAME[target].secret:
        return True
    return isinstance(value, str) and "@" in value and ("url" in name or "endpoint" in name or "proxy" in name)


def _distance(a: str, b: str) -> int:
    """Edit distance counting a swap of two neighbours as one edit (the commonest typo)."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def suggest(name: str) -> str | None:
    """The known key a misspelt one most likely meant; None when no key is plausibly meant."""
    if name in FOREIGN_KEYS:
        return FOREIGN_KEYS[name]
    matches = difflib.get_close_matches(name, known_names(), n=3, cutoff=0.6)
    # Nearest by edits first: difflib alone calls storage_backend close to kvstore_backend.
    matches.sort(key=lambda m: _distance(name, m))
    return matches[0] if matches else None


def _is_typo(name: str, near: str) -> bool:
    """A few edits away, or the known key with a few letters added or cut (s3_regionn, save_chunk_metadata)."""
    if _distance(name, near) <= max(1, min(2, len(near) // 5)):
        return True
    return (name.startswith(near) or near.startswith(name)) and difflib.SequenceMatcher(None, name, near).ratio() >= 0.85


def _port_block_hint(value: Any) -> str:
    """What to write instead of an LMCache fork's ``storage_backend: {connector: {...}}`` block."""
    connector = value.get("connector") if isinstance(value, dict) else None
    connector = connector if isinstance(connector, dict) else {}
    bucket = str(connector.get("bucket") or "BUCKET")
    prefix = str(connector.get("prefix") or "").strip("/")
    url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    region = connector.get("region")
    extra = f" and extra_config: {{s3_region: {region}}}" if region else ""
    return f"remote_url: {url}{extra}"


def _backend_key_hint(name: str) -> str:
    """For ``kvstore_NAME_...``: which backend would add it, when that backend is not installed."""
    from kvstore import plugins

    parts = name.split("_")
    if len(parts) < 3 or parts[0] != "kvstore":
        return ""
    installed = plugins.installed()
    if parts[1] in installed:
        return f" (backend {parts[1]!r} adds no such key)"
    return f" (keys kvstore_NAME_... belong to backend NAME; {parts[1]!r} is not installed)"


def classify(name: str, value: Any = None) -> Key | None:
    """The Key for ``name``; None for a foreign key to ignore; ConfigError for a mistake."""
    if not isinstance(name, str):
        raise ConfigError(f"extra_config keys must be strings, got {type(name).__name__}")
    key = key_named(name)
    if key is not None:
        return key
    if name.startswith(FOREIGN_PREFIXES):
        return None
    if name in FOREIGN_KEYS:
        target = FOREIGN_KEYS[name]
        hint = _FOREIGN_HINTS.get(target, f"use {target}")
        raise ConfigError(f"extra_config key {name!r} is another tool's spelling (boto3, obstore, s3fs, MinIO) that "
                          f"kvstore does not read: {hint}", key=name, suggestion=target)
    if name == "storage_backend":
        error = ConfigError(f"'storage_backend' is a connector block of an LMCache fork that neither LMCache's S3 "
                            f"backend nor kvstore reads; write {_port_block_hint(value)}", key=name)
        error.suggestion = "remote_url"
        raise error
    near = suggest(name)
    if name.startswith(OWN_PREFIXES):
        hint = "" if near is not None and _is_typo(name, near) else _backend_key_hint(name)
        raise ConfigError(f"unknown extra_config key {name!r}{hint}", key=name, suggestion=near)
    if near is not None and _is_typo(name, near):
        raise ConfigError(f"unknown extra_config key {name!r}", key=name, suggestion=near)
    return None
