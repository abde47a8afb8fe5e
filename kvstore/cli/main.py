"""Entry point: ``kvstore <command> ...``. Each command group lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from kvstore.cli.common import EXIT_OK, exit_code_for

# Modules with a ``register(subparsers)`` function; each keeps its heavy imports inside its handlers.
COMMAND_MODULES = (
    "kvstore.cli.store_cmds",
    "kvstore.cli.kv_cmd",
    "kvstore.cli.lmcache_cmd",
    "kvstore.cli.conformance_cmd",
    "kvstore.cli.bench_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="LLM KV-cache chunks in object stores.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeatable)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose, format="%(levelname)s %(name)s: %(message)s")
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
        print(f"kvstore {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
