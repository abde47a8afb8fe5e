"""``kvstore lmcache-config URL``: print an LMCache config (YAML) or MP L2 adapter spec (JSON) for a store."""

from __future__ import annotations

import argparse
import sys

from kvstore.cli.common import add_store_arguments, url_and_config


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "lmcache-config",
        help="print a ready LMCache config for a store",
        description="Print an LMCache YAML (non-MP) or --l2-adapter JSON (MP) that uses kvstore for URL; checks that it resolves.",
    )
    add_store_arguments(parser)
    parser.add_argument("--mode", choices=("non-mp", "mp"), default="non-mp", help="LMCache mode (default non-mp)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from kvstore.lmcache.config_gen import render, withheld_note

    url, extra = url_and_config(args)
    text = render(url, extra, args.mode)
    print(text.rstrip("\n"))
    if args.mode == "mp" and withheld_note(extra):  # JSON has no comments: say it beside the spec
        print(withheld_note(extra).lstrip("# ").rstrip("\n"), file=sys.stderr)
    return 0
