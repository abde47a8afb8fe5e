"""``kvstore lmcache-config [URL] [-c FILE]``: print an LMCache config (YAML) or MP L2 adapter spec (JSON) for a store."""

from __future__ import annotations

import argparse
import sys

from kvstore.cli.common import add_store_arguments, load_extra_config


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "lmcache-config",
        help="print a ready LMCache config for a store",
        description="Print an LMCache YAML (non-MP) or --l2-adapter JSON (MP) that uses kvstore for URL; checks that it "
                    "resolves. With -c, the file is an LMCache config (or --l2-adapter spec) to convert: every key that "
                    "need not change is kept, and each change is listed on stderr.",
    )
    parser.add_argument("url", nargs="?", help="store URL (default: the file's kvstore_url or remote_url)")
    add_store_arguments(parser, url=False)
    parser.add_argument("--mode", choices=("non-mp", "mp"), default="non-mp", help="LMCache mode (default non-mp)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from kvstore.lmcache import config_gen

    url = None if args.url in (None, "-") else args.url
    sets = load_extra_config(None, args.set)
    raw = config_gen.read_file(args.config) if args.config else None
    if args.mode == "mp":
        generated = config_gen.mp_config(raw, url, sets)
    elif raw is not None:
        generated = config_gen.non_mp_from_file(raw, url, sets)
    else:
        generated = config_gen.fresh(url, sets)
    print(generated.text().rstrip("\n"))
    # stderr, so that stdout stays the pasteable configuration
    for change in generated.changes:
        print(f"changed: {change}", file=sys.stderr)
    for warning in generated.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.mode == "mp" and generated.withheld:  # JSON has no comments: say it beside the spec
        print(config_gen.withheld_advice(generated.withheld), file=sys.stderr)
    return 0
