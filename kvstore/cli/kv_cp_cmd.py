"""``kvstore kv cp SRC DST``: copy KV chunks between two stores, each with its own extra_config."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from kvstore.cli.common import EXIT_FAILED, add_json_argument, human_bytes, print_json, print_table, url_and_config
from kvstore.cli.kv_dump_cmd import progress_bar
from kvstore.errors import ConfigError

if TYPE_CHECKING:
    from kvstore.store import KVStore


def add_cp_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="source store URL (s3://..., file:///..., a directory, memory://); "
                   "'-': remote_url/kvstore_url of --src-config")
    p.add_argument("dst", metavar="DST", help="destination store URL; '-': remote_url/kvstore_url of --dst-config")
    for side in ("src", "dst"):
        name = "source" if side == "src" else "destination"
        p.add_argument(f"--{side}-config", metavar="FILE",
                       help=f"the {name}'s extra_config as YAML or JSON (an LMCache config file works)")
        p.add_argument(f"--{side}-set", metavar="KEY=VALUE", action="append", default=[],
                       help=f"one extra_config entry of the {name} (repeatable)")
    p.add_argument("--prefix", default="", help="only objects whose keys start with this")
    p.add_argument("--model", help="only LMCache chunks of this model (as given to kvstore dump)")
    p.add_argument("--dry-run", action="store_true", help="list what would be copied, replaced and skipped; write nothing")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="copy on a pool of Ray actors (ADDRESS: auto, ray://host:10001; none: ray.init()'s default)")
    add_json_argument(p)


def _open(args: argparse.Namespace, side: str) -> KVStore:
    """One side's store, its URL and extra_config taken as every other command takes ``URL -c FILE --set``."""
    import kvstore

    try:
        url, extra = url_and_config(argparse.Namespace(url=getattr(args, side), config=getattr(args, f"{side}_config"),
                                                       set=getattr(args, f"{side}_set")))
        return kvstore.open(url, extra)
    except ConfigError as exc:  # say which of the two stores it is
        raise ConfigError(f"{side.upper()}: {exc}", key=exc.key) from exc


def cmd_cp(args: argparse.Namespace) -> int:
    from kvstore.kv import copy

    items: list[dict[str, Any]] = []

    def on_item(key: str, action: str, size: int) -> None:
        if not args.dry_run:
            return
        if args.json:
            items.append({"key": key, "action": action, "bytes": size})
        else:
            print(f"would {action} {key} ({human_bytes(size)})")

    update = progress_bar(0)

    def progress(objects: int, nbytes: int) -> None:
        update(objects)
        update.bar.set_postfix_str(human_bytes(nbytes), refresh=False)

    with _open(args, "src") as src, _open(args, "dst") as dst:
        try:
            report = copy(src, dst, prefix=args.prefix, model=args.model, dry_run=args.dry_run, on_item=on_item,
                          progress=progress, ray_address=args.ray)
        finally:
            update.bar.close()
    if args.json:
        print_json({**report.as_dict(), **({"items": items} if args.dry_run else {})})
    else:
        print_table(("copied", "replaced", "skipped", "failed", "bytes", "seconds", "objects/s", "GiB/s"),
                    [(report.copied, report.replaced, report.skipped, report.failed, human_bytes(report.bytes),
                      f"{report.seconds:.2f}", f"{report.objects_per_s:.1f}", f"{report.gibps:.3f}")])
        if report.dry_run:
            print("dry run: nothing was written")
    for failure in report.failures:
        print(f"failed: {failure.key}: {failure.reason}", file=sys.stderr)
    if report.vanished:
        print(f"kvstore kv cp: note: {report.vanished} objects were deleted from the source while copying",
              file=sys.stderr)
    return EXIT_FAILED if report.failures else 0
