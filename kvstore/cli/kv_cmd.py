"""``kvstore dump`` and ``kvstore kv ls | stat | verify | gc | cp``: offline KV dumping from the shell.

``dump`` and ``kv verify`` live in ``kv_dump_cmd``; this module registers every command and runs
the inventory ones. The store URL is a positional argument (``--url`` is an alias), and options
and positionals mix in any order.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kvstore.cli.common import (
    EXIT_FAILED,
    add_json_argument,
    add_store_arguments,
    human_bytes,
    print_json,
    print_json_stream,
    print_table,
)
from kvstore.cli.kv_corpus_cmd import add_corpus_arguments
from kvstore.cli.kv_cp_cmd import add_cp_arguments, cmd_cp
from kvstore.cli.kv_dump_cmd import add_prompt_arguments, cmd_dump, cmd_verify, open_store, progress_bar
from kvstore.errors import ConfigError

if TYPE_CHECKING:
    from kvstore.kv.inventory import ChunkInfo
    from kvstore.store import KVStore

_SIZE_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
URL_HELP = "store URL (s3://..., file:///..., a directory, memory://); '-' or none: remote_url/kvstore_url of -c"


class IntermixedParser(argparse.ArgumentParser):
    """Options and positionals in any order (``kv ls URL -l PREFIX``), as ``parse_intermixed_args`` allows."""

    _inner = False

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:  # type: ignore[override]
        if self._inner:
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dump", help="write prompts' KV caches into a store as LMCache chunks")
    _add_url(p)
    add_prompt_arguments(p)
    add_corpus_arguments(p)  # dump only: kv verify shares add_prompt_arguments but takes no corpus
    add_json_argument(p)
    p.set_defaults(handler=_with_url(cmd_dump))

    kv = sub.add_parser("kv", help="inspect and manage dumped KV chunks").add_subparsers(
        dest="kv_command", metavar="COMMAND", parser_class=IntermixedParser)
    kv.required = True
    p = kv.add_parser("ls", help="list chunks")
    _add_url(p)
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("-l", "--long", action="store_true",
                   help="read each chunk's metadata too (token counts, status, chain index; one HEAD each)")
    add_json_argument(p)
    p.set_defaults(handler=_with_url(cmd_ls, prefix=True))

    p = kv.add_parser("stat", help="chunks, bytes, damaged and unreachable chunks per model (one HEAD per chunk)")
    _add_url(p)
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("--tmp-older-than", metavar="AGE", default="1h",
                   help="count the file store's temp files of interrupted writes older than AGE as stale (default 1h)")
    add_json_argument(p)
    p.set_defaults(handler=_with_url(cmd_stat, prefix=True))

    p = kv.add_parser("verify", help="check that every chunk of some prompts is stored, whole and intact")
    _add_url(p)
    add_prompt_arguments(p)
    p.add_argument("--no-read", action="store_true", help="check presence and size only, without reading")
    add_json_argument(p)
    p.set_defaults(handler=_with_url(cmd_verify))

    p = kv.add_parser("gc", help="remove damaged and unreachable chunks, then chain tails (a dry run unless --delete)")
    _add_url(p)
    p.add_argument("--older-than", metavar="AGE", help="remove chunks written longer ago than AGE (90s, 12h, 7d, 2w) "
                   "that no younger chunk depends on")
    p.add_argument("--max-bytes", metavar="SIZE", help="then remove chain tails, deepest first, until at most SIZE remain "
                   "(500M, 20GiB)")
    p.add_argument("--tmp-older-than", metavar="AGE", default="1h",
                   help="file store: remove temp files of interrupted writes older than AGE (default 1h; 'never': keep)")
    p.add_argument("--prefix", default="", help="only chunks under this prefix")
    p.add_argument("--delete", action="store_true", help="really delete (default: only report)")
    add_json_argument(p)
    p.set_defaults(handler=_with_url(cmd_gc))

    p = kv.add_parser("cp", help="copy chunks between two stores (skips identical ones, verifies checksums)")
    add_cp_arguments(p)
    p.set_defaults(handler=cmd_cp)


def _add_url(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", nargs="?", help=URL_HELP)
    p.add_argument("--url", dest="url_option", metavar="URL", help="the store URL (the same as the positional URL)")
    add_store_arguments(p, url=False)


def _with_url(handler: Callable[[argparse.Namespace], int], *, prefix: bool = False) -> Callable[[argparse.Namespace], int]:
    """Merge ``--url`` into the positional URL; with ``--url``, a lone positional is the prefix."""
    def run(args: argparse.Namespace) -> int:
        if args.url_option is not None:
            if args.url is not None and prefix and not args.prefix:
                args.prefix = args.url
            elif args.url is not None and args.url != args.url_option:
                raise ConfigError(f"two store URLs given: {args.url_option!r} (--url) and {args.url!r}")
            args.url = args.url_option
        if args.url == "-":
            args.url = None
        return handler(args)

    return run


# -- commands ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _scan(store: KVStore, prefix: str, *, with_metadata: bool) -> Iterator[Iterator[ChunkInfo]]:
    """Every chunk under ``prefix``, streamed; with metadata, a progress bar while the HEADs run."""
    from kvstore.kv import scan

    if not with_metadata:
        yield scan(store, prefix)
        return
    update = progress_bar(0)
    try:
        yield scan(store, prefix, with_metadata=True, progress=update)
    finally:
        update.bar.close()


def cmd_ls(args: argparse.Namespace) -> int:
    bad: list[ChunkInfo] = []

    def noting(chunks: Iterable[ChunkInfo]) -> Iterator[ChunkInfo]:  # only the damaged chunks are kept, to be named at the end
        for c in chunks:
            if c.status not in (None, "ok"):
                bad.append(c)
            yield c

    with open_store(args) as store, _scan(store, args.prefix, with_metadata=args.long) as found:
        chunks = noting(found)
        if args.json:
            print_json_stream(dataclasses.asdict(c) for c in chunks)
        elif args.long:
            print_table(("status", "tokens", "index", "size", "modified", "key"),
                        ((c.status, _dash(c.tokens), _dash(c.index), c.size, _when(c.last_modified), c.key) for c in chunks))
        else:
            print_table(("size", "modified", "key"), ((c.size, _when(c.last_modified), c.key) for c in chunks))
    for c in bad:
        print(f"{c.status}: {c.key} {c.detail}".rstrip(), file=sys.stderr)
    return EXIT_FAILED if bad else 0


def cmd_stat(args: argparse.Namespace) -> int:
    from kvstore.kv.gc import _Chains, _holes, stale_temp_files

    threshold = parse_age(args.tmp_older_than)
    with open_store(args) as store:
        with _scan(store, args.prefix, with_metadata=True) as found:
            chunks = list(found)  # the chains need every chunk at once, as gc's plan does
        temps = stale_temp_files(store, 0.0)
    holes = _holes(_Chains(chunks))
    models: dict[tuple[str, int, int, str], dict[str, Any]] = {}
    for c in chunks:
        m = models.setdefault((c.model, c.world_size, c.worker_id, c.dtype),
                              {"chunks": 0, "bytes": 0, "damaged": 0, "unreachable": 0, "unchained": 0,
                               "oldest": None, "newest": None})
        m["chunks"] += 1
        m["bytes"] += c.size
        m["damaged"] += holes.get(c.key) == "damaged"
        m["unreachable"] += holes.get(c.key) == "orphan"
        m["unchained"] += not c.chained
        if c.last_modified is not None:
            m["oldest"] = min(m["oldest"] or c.last_modified, c.last_modified)
            m["newest"] = max(m["newest"] or c.last_modified, c.last_modified)
    rows = [{"model": k[0], "world_size": k[1], "worker_id": k[2], "dtype": k[3], **v} for k, v in sorted(models.items())]
    temp = None if temps is None else {
        "files": len(temps), "bytes": sum(s for _, s, _ in temps),
        "stale_files": sum(a > threshold for _, _, a in temps), "stale_bytes": sum(s for _, s, a in temps if a > threshold)}
    if args.json:
        print_json({"models": rows, "temp_files": temp,
                    "problems": [{"key": c.key, "status": c.status, "detail": c.detail} for c in chunks if c.status != "ok"]})
    else:
        print_table(("model", "rank", "dtype", "chunks", "bytes", "damaged", "unreachable", "newest"),
                    [(r["model"], f"{r['worker_id']}/{r['world_size']}", r["dtype"], r["chunks"], human_bytes(r["bytes"]),
                      r["damaged"], r["unreachable"], _when(r["newest"])) for r in rows])
        if temp is not None:
            print(f"temp files of interrupted writes: {temp['files']} ({human_bytes(temp['bytes'])}), "
                  f"{temp['stale_files']} older than {args.tmp_older_than} ({human_bytes(temp['stale_bytes'])}): "
                  "kvstore kv gc --delete removes those")
        for c in chunks:
            if c.status != "ok":
                print(f"{c.status}: {c.key} {c.detail}".rstrip(), file=sys.stderr)
    return EXIT_FAILED if any(c.status != "ok" for c in chunks) else 0


def cmd_gc(args: argparse.Namespace) -> int:
    from kvstore.kv import gc

    older = None if args.older_than is None else parse_age(args.older_than)
    max_bytes = None if args.max_bytes is None else parse_size(args.max_bytes)
    tmp = None if args.tmp_older_than.strip().lower() == "never" else parse_age(args.tmp_older_than)
    update = progress_bar(0)
    with open_store(args) as store:
        try:
            report = gc(store, older_than=older, max_bytes=max_bytes, prefix=args.prefix, dry_run=not args.delete,
                        tmp_older_than=tmp, progress=update)
        finally:
            update.bar.close()
    if args.json:
        print_json({"dry_run": report.dry_run, "removed": [c.key for c in report.removed], "reasons": report.reasons,
                    "removed_bytes": report.removed_bytes, "kept": report.kept, "kept_bytes": report.kept_bytes,
                    "unchained": report.unchained, "temp_files": report.temp_files, "temp_bytes": report.temp_bytes})
        return 0
    verb = "would remove" if report.dry_run else "removed"
    for c in report.removed:
        print(f"{verb} {c.key} ({report.reasons[c.key]})")
    counts: dict[str, int] = {}
    for reason in report.reasons.values():
        counts[reason] = counts.get(reason, 0) + 1
    why = ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
    print(f"{verb} {len(report.removed)} chunks ({human_bytes(report.removed_bytes)}{'; ' + why if why else ''}); "
          f"{report.kept} chunks ({human_bytes(report.kept_bytes)}) kept"
          + (f"; {verb} {report.temp_files} temp files ({human_bytes(report.temp_bytes)})" if report.temp_files else "")
          + ("; run with --delete to remove" if report.dry_run else ""))
    if report.unchained:
        print(f"kvstore kv gc: note: {report.unchained} chunks carry no chain metadata (written by another tool): "
              "they were removed only after every chained tail, newest first", file=sys.stderr)
    return 0


# -- parsing -----------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """``500M``, ``20GiB``, ``1e9`` -> bytes (decimal units, ``i`` for binary ones)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]i?)?[bB]?\s*", text)
    try:
        if m is None:
            raise ValueError
        return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])
    except ValueError:
        raise ConfigError(f"not a size: {text!r} (e.g. 500M, 20GiB)") from None


def parse_age(text: str) -> float:
    """``90s``, ``12h``, ``7d``, ``2w`` (a bare number is seconds) -> seconds."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([smhdw]?)\s*", text)
    try:
        if m is None:
            raise ValueError
        return float(m.group(1)) * _AGE_UNITS[m.group(2) or "s"]
    except ValueError:
        raise ConfigError(f"not an age: {text!r} (e.g. 90s, 12h, 7d)") from None


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
