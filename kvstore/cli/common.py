"""What every command shares: extra_config loading, output as a table or JSON, exit codes."""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from kvstore.errors import ConfigError, KVStoreError

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

    from kvstore.store import KVStore

TABLE_WIDTHS_FROM = 1000  # rows that set a streamed table's column widths

# Exit codes scripts can trust.
EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and found a problem (a miss, a failed check)
EXIT_USAGE = 2  # bad arguments or configuration
EXIT_STORE = 3  # the store failed (auth, bucket, timeout, unavailable)


def add_store_arguments(parser: argparse.ArgumentParser, *, url: bool = True) -> None:
    """URL, -c/--config FILE and --set key=value, as every store command takes them."""
    if url:
        parser.add_argument("url", help="store URL (s3://..., file:///..., memory://...)")
    parser.add_argument("-c", "--config", metavar="FILE", help="extra_config as YAML or JSON (an LMCache config file works: its extra_config is used)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="one extra_config entry (repeatable)")


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def load_extra_config(path: str | None, sets: Sequence[str]) -> dict[str, Any]:
    """extra_config from a YAML/JSON file and --set pairs (later wins)."""
    extra: dict[str, Any] = {}
    if path:
        extra.update(_load_file(path))
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set takes KEY=VALUE, got {item.partition('=')[0]!r} without '='")
        extra[key.strip()] = value
    return extra


def _load_file(path: str) -> dict[str, Any]:
    from kvstore.lmcache.config_gen import read_file

    loaded = read_file(path)
    if "extra_config" not in loaded and "remote_url" not in loaded:
        return loaded
    # An LMCache config file: take its extra_config, and the top-level keys storage understands.
    nested = loaded.get("extra_config")
    if nested is None:
        nested = {}
    if not isinstance(nested, dict):
        raise ConfigError(f"{path}: extra_config must be a mapping of key: value, got {type(nested).__name__}",
                          key="extra_config")
    nested = dict(nested)
    for top, inner in (("remote_url", "kvstore_url"), ("blocking_timeout_secs", "blocking_timeout_secs")):
        if loaded.get(top) is None:
            continue
        if nested.get(inner) is not None and not _same(nested[inner], loaded[top]):
            raise ConfigError(f"{path}: {top} ({_shown(loaded[top])}) and extra_config.{inner} "
                              f"({_shown(nested[inner])}) disagree: keep one", key=inner)
        nested[inner] = loaded[top]
    return nested


# NAME=VALUE where NAME starts a word or follows an option's "=" (--set=NAME=VALUE).
_ASSIGNMENT = re.compile(r"(?<![^\s'\"=])(?P<name>[A-Za-z_][A-Za-z0-9_.]*)=(?P<value>[^\s'\"]*)")
_URL_WITH_USER = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]*@[^\s'\"]*")


def redact_arguments(text: str) -> str:
    """``text`` (an argparse message quoting the command line) with secret values and URL passwords hidden."""
    from kvstore.config.keys import is_secret, redact_url

    def assignment(match: re.Match[str]) -> str:
        return f"{match['name']}=***" if is_secret(match["name"], match["value"]) else match[0]

    return _URL_WITH_USER.sub(lambda m: redact_url(m[0]), _ASSIGNMENT.sub(assignment, text))


class RedactingParser(argparse.ArgumentParser):
    """An argument parser whose usage errors never echo a secret (``--sett aws_secret_access_key=...``)."""

    def error(self, message: str) -> NoReturn:
        super().error(redact_arguments(message))


def _same(a: Any, b: Any) -> bool:
    return a == b or str(a).strip().rstrip("/") == str(b).strip().rstrip("/")


def _shown(value: Any) -> str:
    from kvstore.config.keys import redact_url

    return redact_url(str(value))


def url_and_config(args: argparse.Namespace) -> tuple[str | None, dict[str, Any]]:
    """The command line's URL and extra_config; a URL there and another in the file is an error naming both."""
    path = getattr(args, "config", None)
    extra = load_extra_config(path, getattr(args, "set", []))
    url = getattr(args, "url", None)
    if url in (None, "-"):
        url = None  # taken from the config file's remote_url / kvstore_url
    file_url = extra.get("kvstore_url")
    from_sets = any(item.partition("=")[0].strip() == "kvstore_url" for item in getattr(args, "set", []))
    if url is not None and path and file_url and not from_sets:
        check_same_store(url, str(file_url), path)
    return url, extra


def check_same_store(url: str, file_url: str, path: str) -> None:
    """Raise ``ConfigError`` when the command line's URL and the config file's name different stores."""
    import os

    if _same(url, file_url):
        return

    from kvstore.config.profiles import detect

    def store(text: str) -> tuple[str, str, str, str | None, str]:
        d = detect(text)
        location = os.path.abspath(os.path.expanduser(d.location)) if d.profile == "file" else d.location
        return d.profile, d.bucket, d.prefix, d.endpoint, location

    if store(url) != store(file_url):
        raise ConfigError(f"the URL on the command line ({_shown(url)}) and remote_url / kvstore_url in {path} "
                          f"({_shown(file_url)}) name different stores: give one (URL '-' takes the file's)",
                          key="remote_url")


def open_store(args: argparse.Namespace) -> KVStore:
    import kvstore

    url, extra = url_and_config(args)
    return kvstore.open(url, extra)


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], out: SupportsWrite[str] | None = None) -> None:
    """Rows under their headers, columns as wide as the first ``TABLE_WIDTHS_FROM`` rows need.

    Rows are printed as they come (a listing of millions streams through); a later, longer
    cell widens its own line only.
    """
    out = out or sys.stdout
    it = ([str(c) for c in row] for row in rows)
    first = list(itertools.islice(it, TABLE_WIDTHS_FROM))
    widths = [max([len(h)] + [len(r[i]) for r in first]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in itertools.chain(first, it):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_json_stream(items: Iterable[Any]) -> None:
    """A JSON array written an item at a time, so that a long listing never sits in memory whole."""
    out = sys.stdout
    out.write("[")
    for i, item in enumerate(items):
        out.write(",\n  " if i else "\n  ")
        out.write(json.dumps(item, default=str))
    out.write("\n]\n")


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, (ConfigError, ValueError)):
        return EXIT_USAGE
    if isinstance(exc, KVStoreError):
        return EXIT_STORE
    return EXIT_FAILED


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
