"""Profiles: what each kind of store is, how a URL is recognised as one, and its invariants.

Detection is one ordered list of rules (``RULES``), read top to bottom; the first that matches
wins. A rule only reads the URL; extra_config and the environment are applied afterwards by
``kvstore.config.resolve``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from kvstore.config.keys import redact_url
from kvstore.errors import ConfigError

MiB = 1024 * 1024


@dataclass(frozen=True)
class Profile:
    """A kind of store. Its default backend is the installed one that serves it with the highest priority."""

    name: str
    addressing: str | None = None  # default addressing; None for non-S3 profiles
    allowed_addressing: tuple[str, ...] = ("virtual", "path")
    tls_only: bool = False
    prefer_http2: bool = False
    checksum: str = "crc32c"
    part_size: int = 8 * MiB
    min_part_size: int = 5 * MiB
    doc: str = ""

    @property
    def is_s3(self) -> bool:
        return self.addressing is not None


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("aws", "virtual", prefer_http2=False, doc="AWS S3 general-purpose buckets."),
        Profile("s3express", "virtual", ("virtual",), tls_only=True, prefer_http2=True, doc="S3 Express One Zone directory buckets: zonal endpoint, session auth, CRC32C."),
        Profile("coreweave", "virtual", ("virtual",), part_size=16 * MiB, min_part_size=15 * MiB,
                doc="CoreWeave AI Object Storage: LOTA (http://cwlota.com) or primary (https://cwobject.com)."),
        Profile("minio", "path", doc="MinIO and other self-hosted S3 (Ceph RGW, SeaweedFS): path-style, custom port."),
        Profile("s3", "path", doc="Any other S3-compatible endpoint given by s3_endpoint_url."),
        Profile("file", doc="A local directory (embedded)."),
        Profile("memory", checksum="none", doc="Process-local memory (embedded, for tests and demos)."),
    )
}


def profile_named(name: str) -> Profile:
    """A core profile, or one an installed backend adds; ``KeyError`` for neither."""
    if name in PROFILES:
        return PROFILES[name]
    from kvstore import plugins

    return plugins.added_profiles()[name][0]


def profile_names() -> tuple[str, ...]:
    from kvstore import plugins

    return (*PROFILES, *sorted(plugins.added_profiles()))


@dataclass(frozen=True)
class Detected:
    """What the URL alone says. ``None`` fields are left to extra_config, env and defaults."""

    profile: str
    bucket: str = ""
    prefix: str = ""
    endpoint: str | None = None  # service host[:port] without the bucket, when the URL names it
    region: str | None = None
    addressing: str | None = None
    tls: bool | None = None
    location: str = ""  # file root, memory name, or the URL a backend's own profile takes whole
    fields_from_url: tuple[str, ...] = field(default=())


_AWS_VIRTUAL = re.compile(r"^(?P<bucket>.+)\.s3[.-](?:dualstack\.)?(?P<region>[a-z0-9-]+)\.amazonaws\.com$")
_AWS_GLOBAL = re.compile(r"^(?P<bucket>.+)\.s3\.amazonaws\.com$")
_AWS_PATH = re.compile(r"^s3[.-](?:dualstack\.)?(?P<region>[a-z0-9-]+)\.amazonaws\.com$")
_EXPRESS_HOST = re.compile(r"^(?P<bucket>.+--(?P<az>[a-z0-9-]+)--x-s3)\.s3express-(?P=az)\.(?P<region>[a-z0-9-]+)\.amazonaws\.com$")
_EXPRESS_HOST_LOOSE = re.compile(r"^(?P<bucket>[^.]+)\.s3express-(?P<az>[a-z0-9-]+)\.(?P<region>[a-z0-9-]+)\.amazonaws\.com$")
_EXPRESS_BUCKET = re.compile(r"^(?P<name>[a-z0-9][a-z0-9.-]*)--(?P<az>[a-z0-9]+-az\d+)--x-s3$")
_COREWEAVE = re.compile(r"^(?P<bucket>.+)\.(?P<domain>cwlota\.com|cwobject\.com)$")
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?$")

# AZ-id prefixes of S3 Express zones to their region, so "name--usw2-az1--x-s3" needs no s3_region.
AZ_REGIONS = {
    "use1": "us-east-1", "use2": "us-east-2", "usw1": "us-west-1", "usw2": "us-west-2",
    "aps1": "ap-south-1", "apne1": "ap-northeast-1", "apse1": "ap-southeast-1", "apse2": "ap-southeast-2",
    "euw1": "eu-west-1", "euc1": "eu-central-1", "eun1": "eu-north-1",
}


def s3express_host(az: str, region: str) -> str:
    return f"s3express-{az}.{region}.amazonaws.com"


def express_zone(bucket: str) -> str | None:
    match = _EXPRESS_BUCKET.match(bucket)
    return match.group("az") if match else None


def is_loopback_or_private(host: str) -> bool:
    """True for hosts where plain HTTP is expected: loopback, link-local, private, cluster-local."""
    host = host.strip("[]").lower()
    # cwlota.com is CoreWeave's in-cluster cache, plain HTTP by design.
    if host in ("localhost", "cwlota.com") or host.endswith(
            (".localhost", ".local", ".internal", ".cluster.local", ".svc", ".cwlota.com")):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "." not in host  # a bare service name inside a cluster
    return address.is_loopback or address.is_private or address.is_link_local


def _split_path(path: str) -> tuple[str, str]:
    parts = [p for p in unquote(path).split("/") if p]
    if not parts:
        return "", ""
    return parts[0], "/".join(parts[1:])


def _authority(parts: SplitResult, url: str) -> tuple[str, int | None]:
    # userinfo would carry secrets inside a URL that ends up in logs: refuse it outright, before
    # anything else can quote it. An "@" in the bucket part means a password with an unencoded "/".
    if "@" in parts.netloc or (":" in parts.netloc and "@" in parts.path.lstrip("/").split("/", 1)[0]):
        raise ConfigError(f"credentials in the URL are not accepted ({redact_url(url)!r}): use aws_access_key_id / "
                          f"aws_secret_access_key")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"invalid port in {url!r}: expected a number between 0 and 65535") from None
    host = (parts.hostname or "").lower()
    if not host:
        raise ConfigError(f"no host or bucket in {url!r}")
    return host, port


def _hostport(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}" if port else shown


def _detect_s3(url: str) -> Detected:
    parts = urlsplit(url)
    host, port = _authority(parts, url)
    path_bucket, path_rest = _split_path(parts.path)
    prefix_only = unquote(parts.path).strip("/")

    if match := (_EXPRESS_HOST.match(host) or _EXPRESS_HOST_LOOSE.match(host)):
        return Detected("s3express", match["bucket"], prefix_only, host[len(match["bucket"]) + 1:], match["region"],
                        "virtual", True, fields_from_url=("bucket", "endpoint", "region", "addressing"))
    if match := _COREWEAVE.match(host):
        tls = match["domain"] == "cwobject.com"
        # The domain gives TLS a default only: LOTA is plain HTTP, but disable_tls may still say otherwise.
        return Detected("coreweave", match["bucket"], prefix_only, match["domain"], None, "virtual", tls,
                        fields_from_url=("bucket", "endpoint", "addressing"))
    if match := _AWS_VIRTUAL.match(host):
        return Detected("aws", match["bucket"], prefix_only, host[len(match["bucket"]) + 1:], match["region"], "virtual", True,
                        fields_from_url=("bucket", "endpoint", "region", "addressing"))
    if match := _AWS_GLOBAL.match(host):
        return Detected("aws", match["bucket"], prefix_only, None, None, "virtual", True,
                        fields_from_url=("bucket", "addressing"))
    if match := _AWS_PATH.match(host):
        if not path_bucket:
            raise ConfigError(f"no bucket in {url!r}: expected s3://{host}/BUCKET[/prefix]")
        return Detected("aws", path_bucket, path_rest, host, match["region"], "path", True,
                        fields_from_url=("bucket", "endpoint", "region", "addressing"))
    if _EXPRESS_BUCKET.match(host):
        return Detected("s3express", host, prefix_only, None, None, "virtual", True,
                        fields_from_url=("bucket",))
    if port is not None or _is_ip(host) or host == "localhost":
        # A self-hosted endpoint: s3://host:port/bucket/prefix (path-style), or
        # s3://bucket.host:port (virtual-hosted, as LMCache writes it for MinIO with MINIO_DOMAIN).
        if path_bucket:
            return Detected("minio", path_bucket, path_rest, _hostport(host, port), None, "path", None,
                            fields_from_url=("bucket", "endpoint", "addressing"))
        if "." in host and not _is_ip(host):
            bucket, _, domain = host.partition(".")
            return Detected("minio", bucket, "", _hostport(domain, port), None, "virtual", None,
                            fields_from_url=("bucket", "endpoint", "addressing"))
        raise ConfigError(f"no bucket in {url!r}: expected s3://{_hostport(host, port)}/BUCKET[/prefix]")
    written = parts.netloc.rpartition("@")[2].split(":", 1)[0]
    if written != host:
        # The host part is read case-insensitively, so S3 would be asked for another bucket.
        raise ConfigError(f"bucket {written!r} in {url!r} has capitals: S3 bucket names are lowercase "
                          f"(a legacy bucket with capitals: https://s3.REGION.amazonaws.com/{written})")
    return Detected("aws", host, prefix_only, fields_from_url=("bucket",))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _detect_http(url: str) -> Detected:
    parts = urlsplit(url)
    host, port = _authority(parts, url)
    scheme = parts.scheme.lower()
    tls = scheme in ("https", "minios")
    aws = _detect_s3(url) if host.endswith((".amazonaws.com", ".cwlota.com", ".cwobject.com")) else None
    if aws is not None:
        return Detected(aws.profile, aws.bucket, aws.prefix, aws.endpoint, aws.region, aws.addressing, tls,
                        fields_from_url=aws.fields_from_url + ("tls",))
    bucket, rest = _split_path(parts.path)
    if not bucket:
        raise ConfigError(f"no bucket in {url!r}: expected {scheme}://HOST[:PORT]/BUCKET[/prefix]")
    return Detected("minio", bucket, rest, _hostport(host, port), None, "path", tls,
                    fields_from_url=("bucket", "endpoint", "addressing", "tls"))


def _detect_file(url: str) -> Detected:
    if url.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"file URLs name a local path: file:///abs/dir, got {url!r}")
        path = unquote(parts.path)
    else:
        path = url
    if not path or "\x00" in path:
        raise ConfigError(f"not a usable directory path: {url!r}")
    return Detected("file", location=path, fields_from_url=("location",))


def _detect_memory(url: str) -> Detected:
    name = url[len("memory://"):].strip("/")
    return Detected("memory", location=name or "default", fields_from_url=("location",))


def _detect_added(url: str) -> Detected:
    """A URL whose scheme an installed backend claims (``schemes``): the backend takes it whole."""
    from kvstore import plugins

    profile = plugins.scheme_profile(_scheme(url))
    if profile is None:
        raise AssertionError("_check_shape lets through only schemes a backend claims")
    return Detected(profile, location=url, fields_from_url=("location",))


def _scheme(url: str) -> str:
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", url)
    return match.group(1).lower() if match else ""


_OWN_SCHEMES = ("s3", "s3a", "http", "https", "minio", "minios", "memory", "file")


def _check_shape(url: str) -> None:
    """Refuse what looks like a URL with its ``://`` mangled, before it is taken for a relative path."""
    scheme = _scheme(url)
    if scheme:
        if scheme not in _OWN_SCHEMES:
            from kvstore import plugins

            if plugins.scheme_profile(scheme) is None:
                raise ConfigError(f"unknown URL scheme {scheme!r} in {url!r}: expected s3://, http(s)://, minio://, "
                                  f"file:///, memory:// or a scheme an installed backend serves "
                                  f"(installed: {', '.join(sorted(plugins.installed()))})")
        return
    if match := re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):(?!//)", url):
        name = match.group(1).lower()
        if name == "file":
            raise ConfigError(f"file URLs need an absolute path, file:///abs/dir, got {url!r} (or give a plain path)")
        raise ConfigError(f"malformed URL {url!r}: expected {name}://{url[len(name) + 1:].lstrip('/')} "
                          f"(or ./{url} for a directory of that name)")
    first = url.split("/", 1)[0].lower()
    if first in _OWN_SCHEMES and url[len(first):].startswith("//"):
        raise ConfigError(f"malformed URL {url!r}: expected {first}:{url[len(first):]} "
                          f"(or ./{url} for a directory of that name)")


RULES: tuple[tuple[str, Callable[[str], bool], Callable[[str], Detected]], ...] = (
    ("s3:// and s3a:// URLs (AWS, S3 Express, CoreWeave, host:port)", lambda u: _scheme(u) in ("s3", "s3a"), _detect_s3),
    ("http(s):// and minio(s):// endpoints with /BUCKET in the path", lambda u: _scheme(u) in ("http", "https", "minio", "minios"), _detect_http),
    ("memory://NAME", lambda u: _scheme(u) == "memory", _detect_memory),
    ("file:///abs/dir or a plain path", lambda u: _scheme(u) in ("", "file"), _detect_file),
    ("a scheme an installed backend claims (gs://, az://, ...)", lambda u: True, _detect_added),
)


def detect(url: str) -> Detected:
    """Apply the first matching rule of ``RULES`` to ``url``."""
    if not isinstance(url, str) or not url.strip():
        given: object = url  # untyped callers may pass anything
        raise ConfigError(f"a store URL is required, got {url!r}" if isinstance(given, str) or given is None
                          else f"a store URL must be a string, got {type(url).__name__}")
    url = url.strip()
    try:
        return _detect_checked(url)
    except ConfigError as exc:
        if "@" not in url:
            raise
        error = exc
    # The messages quote the URL; a password in it (user:pw@, or a slip) is never shown. Raised
    # outside the handler, the new error keeps no link to the unredacted one.
    shown = redact_url(url)
    raise ConfigError(str(error).replace(repr(url), repr(shown)).replace(url, shown), key=error.key)


def _detect_checked(url: str) -> Detected:
    if any(ord(c) < 32 for c in url):
        raise ConfigError(f"control characters in URL {url!r}")
    _check_shape(url)
    if _scheme(url) in _OWN_SCHEMES:
        parts = urlsplit(url)
        if parts.query or parts.fragment or url.endswith(("?", "#")):
            # Nothing reads them, and a setting written there (?region=...) would be lost in silence.
            # Only the names are quoted: a presigned URL's query carries a signature.
            base = url.split("?", 1)[0].split("#", 1)[0]
            names = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True)]
            what = f"query parameters {', '.join(names)}" if names else "a query or fragment"
            raise ConfigError(f"{base!r} is followed by {what}, which kvstore does not read: give settings in "
                              f"extra_config (s3_region, s3_endpoint_url, ...) and percent-encode '?' and '#' in a prefix")
    for _, matches, rule in RULES:
        if matches(url):
            try:
                return rule(url)
            except ValueError as exc:
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(f"malformed URL {url!r}: {exc}") from None
    raise AssertionError("the last rule matches every URL")


def detect_endpoint_host(spec: str) -> Detected:
    """The MP-mode ``s3_endpoint``: ``s3://bucket`` or the bare host form ``bucket.s3.REGION.amazonaws.com``."""
    return detect(spec if "://" in spec else f"s3://{spec}")


def valid_bucket(name: str) -> bool:
    return 3 <= len(name) <= 63 and all(_HOST_LABEL.match(label) for label in name.split(".")) and name == name.strip()
