"""The table of every extra_config key kvstore understands.

One table drives validation, did-you-mean suggestions, provenance in ``kvstore resolve`` and the
generated configuration reference (docs/configuration.md). Values arrive as YAML gives them, so
every parser accepts strings ("True", "64", "16MiB") as well as native values.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable

from kvstore.errors import ConfigError

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
    field: str | None  # the StoreConfig field it sets; None for keys that only steer detection
    parse: Callable[[Any], Any]
    doc: str
    kind: str  # type shown in the reference
    origin: str  # who defined it: "lmcache", "lmcache-legacy", "lmcache-mp", "kvstore"
    secret: bool = False
    legacy_of: str | None = None  # the current key this older spelling maps to


KEYS: tuple[Key, ...] = (
    # LMCache's S3 backend, current generation (s3_adapter.py, docs since Nov 2025).
    Key("s3_region", "region", parse_str, "Region to sign requests for. Taken from the host when the URL names one.", "str", "lmcache"),
    Key("s3_num_io_threads", "io_threads", parse_int, "Event-loop threads of the CRT client (0: one per CPU, between 4 and 16; see docs/benchmarks.md).", "int", "lmcache"),
    Key("s3_prefer_http2", "prefer_http2", parse_bool, "Offer HTTP/2 through ALPN (TLS only).", "bool", "lmcache"),
    Key("s3_enable_s3express", "s3express", parse_bool, "Sign with S3 Express sessions (CreateSession).", "bool", "lmcache"),
    Key("disable_tls", "tls", parse_bool, "Plain HTTP instead of HTTPS (stored inverted as `tls`).", "bool", "lmcache"),
    Key("aws_access_key_id", "credentials", parse_str, "Static access key id; else the AWS default chain.", "str", "lmcache", secret=True),
    Key("aws_secret_access_key", "credentials", parse_str, "Static secret key; else the AWS default chain.", "str", "lmcache", secret=True),
    Key("save_chunk_meta", "save_chunk_meta", parse_bool, "LMCache's per-chunk RemoteMetadata header. kvstore keeps object bytes raw and carries shape/dtype as object metadata instead.", "bool", "lmcache"),
    Key("blocking_timeout_secs", "timeout_s", parse_float, "Deadline of one operation, retries included.", "float", "lmcache"),
    # LMCache's first documented generation (Aug-Oct 2025).
    Key("s3_max_io_concurrency", "io_threads", parse_int, "Older name of s3_num_io_threads.", "int", "lmcache-legacy", legacy_of="s3_num_io_threads"),
    Key("s3_max_inflight_reqs", "max_inflight", parse_int, "Older name of kvstore_max_inflight.", "int", "lmcache-legacy", legacy_of="kvstore_max_inflight"),
    Key("s3_file_prefix", "prefix", parse_str, "Older way to set the object prefix; prefer the URL path.", "str", "lmcache-legacy"),
    # LMCache MP-mode L2 adapter spec ("type": "s3").
    Key("s3_endpoint", None, parse_str, "MP-mode bucket URL: s3://bucket or the bare host form.", "str", "lmcache-mp"),
    Key("max_capacity_gb", "capacity_bytes", parse_float, "Capacity reported by the L2 adapter's get_usage (0: untracked).", "float", "lmcache-mp"),
    # kvstore's own.
    Key("kvstore_url", None, parse_str, "The store URL when it travels inside extra_config (LMCache plugins).", "str", "kvstore"),
    Key("kvstore_profile", "profile", choice("aws", "s3express", "coreweave", "minio", "s3", "file", "memory", "fsspec"), "Force a profile instead of detecting it from the URL.", "str", "kvstore"),
    Key("kvstore_backend", "backend", choice("crt", "obstore", "fsspec", "file", "memory"), "Force a backend instead of the profile's default.", "str", "kvstore"),
    Key("s3_endpoint_url", "endpoint", parse_str, "Full scheme://host[:port] to connect to (self-hosted S3).", "str", "kvstore"),
    Key("s3_addressing_style", "addressing", choice("virtual", "path"), "Virtual-hosted (bucket in the host) or path-style requests.", "str", "kvstore"),
    Key("s3_ca_bundle", "ca_bundle", parse_str, "PEM file of CA certificates to trust for TLS.", "str", "kvstore"),
    Key("s3_proxy_url", "proxy_url", parse_proxy_url, "HTTP(S) proxy for every request: http://[user:password@]host:port (obstore and fsspec backends; awscrt's S3 client has no proxy support).", "str", "kvstore"),
    Key("s3_part_size", "part_size", parse_size, "Multipart and ranged-GET part size.", "size", "kvstore"),
    Key("aws_session_token", "credentials", parse_str, "Session token that goes with static keys.", "str", "kvstore", secret=True),
    Key("aws_profile", "credentials", parse_str, "Named profile of the shared AWS config files.", "str", "kvstore"),
    Key("kvstore_max_inflight", "max_inflight", parse_int, "Most requests in flight per store; larger batches queue.", "int", "kvstore"),
    Key("kvstore_timeout_s", "timeout_s", parse_float, "Deadline of one operation, retries included.", "float", "kvstore"),
    Key("kvstore_connect_timeout_s", "connect_timeout_s", parse_float, "TCP/TLS connect timeout.", "float", "kvstore"),
    Key("kvstore_max_retries", "max_retries", parse_int, "Retries of an idempotent operation after a transient failure.", "int", "kvstore"),
    Key("kvstore_checksum", "checksum", choice("crc32c", "none"), "End-to-end checksum stored with each object and checked on read.", "str", "kvstore"),
    Key("kvstore_key_layout", "key_layout", choice("flat", "hashed"), "LMCache object names as LMCache writes them, or behind a short hash prefix.", "str", "kvstore"),
    Key("kvstore_fsync", "fsync", parse_bool, "file store: fsync each object before it becomes visible.", "bool", "kvstore"),
    Key("kvstore_breaker_threshold", "breaker_threshold", parse_int, "Consecutive connection failures that open the circuit breaker (0: off).", "int", "kvstore"),
    Key("kvstore_breaker_reset_s", "breaker_reset_s", parse_float, "Seconds an open breaker waits before letting one probe through.", "float", "kvstore"),
)

BY_NAME: dict[str, Key] = {key.name: key for key in KEYS}

# LMCache puts keys for other parts of itself into the same dict; they are not ours to judge.
FOREIGN_PREFIXES = ("remote_storage_plugin.", "storage_plugin.", "l2_adapter.", "lmcache.")
# Keys with these prefixes are storage settings: an unknown one is a mistake, never ignored.
OWN_PREFIXES = ("s3_", "kvstore_", "aws_")


def is_secret(name: str, value: Any) -> bool:
    """Whether this extra_config entry must never be written out: a secret key, or a URL with a password."""
    key = BY_NAME.get(name)
    if key is not None and key.secret:
        return True
    return name == "s3_proxy_url" and isinstance(value, str) and "@" in value


def suggest(name: str) -> str | None:
    """The nearest known key to a misspelt one."""
    matches = difflib.get_close_matches(name, list(BY_NAME), n=1, cutoff=0.6)
    return matches[0] if matches else None


def classify(name: str) -> Key | None:
    """The Key for ``name``; None for a foreign key to ignore; ConfigError for a mistake."""
    if not isinstance(name, str):
        raise ConfigError(f"extra_config keys must be strings, got {name!r}")
    key = BY_NAME.get(name)
    if key is not None:
        return key
    if name.startswith(FOREIGN_PREFIXES):
        return None
    near = suggest(name)
    close = near is not None and difflib.SequenceMatcher(None, name, near).ratio() >= 0.85
    if name.startswith(OWN_PREFIXES) or close:
        raise ConfigError(f"unknown extra_config key {name!r}", key=name, suggestion=near)
    return None
