"""What every command shares: extra_config loading, output as a table or JSON, exit codes."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Iterable, Sequence

from kvstore.errors import ConfigError, KVStoreError

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
        import yaml

        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML or JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping")
        # An LMCache config file: take its extra_config, and the top-level keys storage understands.
        if "extra_config" in loaded or "remote_url" in loaded:
            nested = loaded.get("extra_config") or {}
            if "blocking_timeout_secs" in loaded:
                nested.setdefault("blocking_timeout_secs", loaded["blocking_timeout_secs"])
            if loaded.get("remote_url"):
                nested.setdefault("kvstore_url", loaded["remote_url"])
            loaded = nested
        extra.update(loaded)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        extra[key.strip()] = value
    return extra


def url_and_config(args: argparse.Namespace) -> tuple[str | None, dict[str, Any]]:
    extra = load_extra_config(args.config, args.set)
    url = getattr(args, "url", None)
    if url in (None, "-"):
        url = None  # taken from the config file's remote_url / kvstore_url
    return url, extra


def open_store(args: argparse.Namespace):
    import kvstore

    url, extra = url_and_config(args)
    return kvstore.open(url, extra)


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], out=None) -> None:
    out = out or sys.stdout
    rows = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


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
