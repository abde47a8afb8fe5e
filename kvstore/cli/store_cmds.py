"""``kvstore resolve | put | get | stat | ls | rm``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvstore.cli.common import (
    EXIT_FAILED,
    add_json_argument,
    add_store_arguments,
    human_bytes,
    open_store,
    print_json,
    print_json_stream,
    print_table,
    url_and_config,
)
from kvstore.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("resolve", help="show the configuration a URL and extra_config resolve to")
    p.add_argument("url", nargs="?", help="store URL (s3://..., file:///..., memory://...)")
    add_store_arguments(p, url=False)
    p.add_argument("--backends", action="store_true", help="list the installed backends instead")
    add_json_argument(p)
    p.set_defaults(handler=cmd_resolve)

    p = sub.add_parser("put", help="store a file (or stdin) under a key")
    add_store_arguments(p)
    p.add_argument("key")
    p.add_argument("file", nargs="?", default="-", help="file to upload (default: stdin)")
    p.add_argument("--meta", metavar="K=V", action="append", default=[], help="object metadata (repeatable)")
    p.set_defaults(handler=cmd_put)

    p = sub.add_parser("get", help="write an object to a file (or stdout)")
    add_store_arguments(p)
    p.add_argument("key")
    p.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    p.set_defaults(handler=cmd_get)

    p = sub.add_parser("stat", help="size and metadata of an object")
    add_store_arguments(p)
    p.add_argument("key")
    add_json_argument(p)
    p.set_defaults(handler=cmd_stat)

    p = sub.add_parser("ls", help="list keys")
    add_store_arguments(p)
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("-l", "--long", action="store_true", help="with sizes and times")
    add_json_argument(p)
    p.set_defaults(handler=cmd_ls)

    p = sub.add_parser("rm", help="delete keys")
    add_store_arguments(p)
    p.add_argument("keys", nargs="+")
    p.set_defaults(handler=cmd_rm)


def cmd_resolve(args: argparse.Namespace) -> int:
    import kvstore

    if args.backends:
        return _list_backends(args.json)
    url, extra = url_and_config(args)
    if url is None and not extra:
        raise ConfigError("a store URL is required (or --backends)")
    config = kvstore.resolve(url, extra)
    if args.json:
        print_json(config.as_dict())
    else:
        print_table(("field", "value", "from"), config.rows())
    return 0


def _list_backends(as_json: bool) -> int:
    from kvstore import plugins

    rows: list[dict[str, Any]] = [{"backend": b.name, "distribution": b.origin or b.distribution, "serves": list(b.serves),
             "priority": b.priority, "proxy": b.proxy, "keys": [k.name for k in b.keys], "status": "ok"}
            for b in plugins.by_priority()]
    rows += [{"backend": name, "distribution": "", "serves": [], "priority": None, "proxy": None, "keys": [],
              "status": f"cannot be loaded: {why}"} for name, why in plugins.broken()]
    if as_json:
        print_json(rows)
    else:
        print_table(("backend", "from", "serves", "priority", "keys", "status"),
                    [(r["backend"], r["distribution"], ", ".join(r["serves"]), "" if r["priority"] is None else str(r["priority"]),
                      ", ".join(r["keys"]), r["status"]) for r in rows])
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    metadata = dict(item.partition("=")[::2] for item in args.meta)
    data = sys.stdin.buffer.read() if args.file == "-" else open(args.file, "rb").read()
    with open_store(args) as store:
        store.put(args.key, data, metadata)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        info = store.stat(args.key)
        if info is None:
            print(f"kvstore get: no such key: {args.key}", file=sys.stderr)
            return EXIT_FAILED
        buffer = bytearray(info.size)
        size = store.get_into(args.key, buffer)
    if size is None:
        print(f"kvstore get: no such key: {args.key}", file=sys.stderr)
        return EXIT_FAILED
    if args.output == "-":
        sys.stdout.buffer.write(memoryview(buffer)[:size])
    else:
        with open(args.output, "wb") as f:
            f.write(memoryview(buffer)[:size])
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        info = store.stat(args.key)
    if info is None:
        print(f"kvstore stat: no such key: {args.key}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print_json({"key": info.key, "size": info.size, "metadata": dict(info.metadata), "last_modified": info.last_modified})
    else:
        print_table(("field", "value"), [("key", info.key), ("size", f"{info.size} ({human_bytes(info.size)})"),
                                         *((f"meta.{k}", v) for k, v in sorted(info.metadata.items()))])
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        infos = store.scan(args.prefix)
        if args.json:
            print_json_stream({"key": i.key, "size": i.size, "last_modified": i.last_modified} for i in infos)
        elif args.long:
            print_table(("size", "key"), ((i.size, i.key) for i in infos))
        else:
            for info in infos:
                print(info.key)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        removed = store.delete_many(args.keys)
    missing = [k for k, ok in zip(args.keys, removed) if not ok]
    for key in missing:
        print(f"kvstore rm: no such key: {key}", file=sys.stderr)
    return EXIT_FAILED if missing else 0
