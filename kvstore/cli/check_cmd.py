"""``kvstore check [URL] [-c FILE] [--set k=v] [--json]``: probe a store end to end before deploying."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvstore.cli.common import add_json_argument, add_store_arguments, check_same_store, load_extra_config, print_json
from kvstore.errors import ConfigError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "check",
        help="write, read back, stat, list and delete one probe object",
        description="Resolve the configuration, connect, write one probe object under a random name, read it back, "
                    "stat, list and delete it; one line per step. -c takes an LMCache config file, an --l2-adapter "
                    "spec or bare extra_config. Exit 0: all steps pass; 1: a step got a wrong answer; "
                    "2: configuration error; 3: store error (auth, missing bucket, unreachable).",
    )
    parser.add_argument("url", nargs="?", help="store URL (default: the file's kvstore_url, remote_url or s3_endpoint)")
    add_store_arguments(parser, url=False)
    add_json_argument(parser)
    parser.set_defaults(handler=run)


def _settings(args: argparse.Namespace) -> tuple[str | None, dict[str, Any]]:
    from kvstore.lmcache import config_gen

    url = None if args.url in (None, "-") else args.url
    extra: dict[str, Any] = {}
    if args.config:
        raw = config_gen.read_file(args.config)
        file_url, extra = config_gen.store_settings(raw)
        if url and file_url:
            check_same_store(url, file_url, args.config)  # as every other command does: naming two stores is an error
        url = url or file_url
        for warning in config_gen.file_warnings(raw):
            print(f"warning: {warning}", file=sys.stderr)
    extra.update(load_extra_config(None, args.set))
    return url, extra


def run(args: argparse.Namespace) -> int:
    from kvstore.check import config_failure, probe

    try:
        url, extra = _settings(args)
    except ConfigError as exc:
        report = config_failure(exc)
    else:
        report = probe(url, extra)
    if args.json:
        print_json(report.as_dict())
    else:
        for line in report.lines():
            print(line)
    return report.exit_code
