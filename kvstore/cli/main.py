"""Entry point: ``kvstore <command> ...``. Each command group lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

import kvstore
from kvstore.cli.common import EXIT_OK, EXIT_USAGE, RedactingParser, exit_code_for, url_and_config

# Modules with a ``register(subparsers)`` function; each keeps its heavy imports inside its handlers.
COMMAND_MODULES = (
    "kvstore.cli.store_cmds",
    "kvstore.cli.kv_cmd",
    "kvstore.cli.lmcache_cmd",
    "kvstore.cli.conformance_cmd",
    "kvstore.cli.bench_cmd",
    "kvstore.cli.check_cmd",
)

TLS_HINT = "the endpoint may not speak TLS: use http:// or disable_tls"


class _CommandParser(RedactingParser):
    """A command's parser: options and positionals in any order, and ``-v`` after the command too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("conflict_handler", "resolve")  # a command may define its own -v
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self._intermixing = False

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:  # type: ignore[override]
        if self._intermixing:  # the intermixed parse calls back in for each of its two passes
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        except TypeError:  # a parser with sub-commands (kvstore kv ...): argparse cannot intermix it
            return super().parse_known_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    parser = RedactingParser(prog="kvstore", description="LLM KV-cache chunks in object stores.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {kvstore.__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more: -v kvstore's INFO, -vv kvstore's DEBUG (other libraries stay at WARNING)")
    parser.add_argument("--log-level", metavar="LOGGER=LEVEL", action="append", default=[],
                        help="set one logger's level, e.g. botocore=DEBUG (repeatable; may log request headers)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def configure_logging(verbose: int, levels: list[str]) -> None:
    """Only kvstore's own loggers follow ``-v``: botocore at DEBUG logs credentials headers."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        logging.getLogger("kvstore").setLevel(max(logging.DEBUG, logging.WARNING - 10 * verbose))
    for item in levels:
        name, sep, level = item.partition("=")
        if not sep or not isinstance(logging.getLevelName(level.strip().upper()), int):
            raise ValueError(f"--log-level takes LOGGER=LEVEL (DEBUG, INFO, WARNING, ERROR), got {item!r}")
        logging.getLogger(name.strip() or None).setLevel(level.strip().upper())


def tls_hint(args: argparse.Namespace, exc: BaseException) -> str:
    """The hint for a TLS failure against what is likely a plain-HTTP server ("" when it does not apply)."""
    text: list[str] = []
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        text.append(f"{type(link).__name__} {link}")
        link = link.__cause__ or link.__context__
    if isinstance(exc, kvstore.ConfigError) or TLS_HINT in str(exc) or not re.search(r"tls|ssl", " ".join(text), re.I):
        return ""
    try:
        from urllib.parse import urlsplit

        url, extra = url_and_config(args)
        config = kvstore.resolve(url, extra)
        explicit_port = urlsplit(config.base_endpoint).port is not None
    except Exception:
        return ""
    # An explicit port is where self-hosted servers (MinIO, Ceph, moto) answer plain HTTP.
    return f" ({TLS_HINT})" if config.is_s3 and config.tls and explicit_port else ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_logging(args.verbose, args.log_level)
    except ValueError as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.handler(args) or EXIT_OK)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # every failure becomes one clear line and an exit code
        if args.verbose > 1:
            raise
        code = exit_code_for(exc)
        command = " ".join(filter(None, (args.command, getattr(args, "kv_command", None))))
        print(f"kvstore {command}: {type(exc).__name__}: {exc}{tls_hint(args, exc)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
