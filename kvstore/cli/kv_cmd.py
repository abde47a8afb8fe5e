"""``kvstore dump`` and ``kvstore kv ls | stat | verify | gc``: offline KV dumping from the shell.

Prompts come from a safetensors file (``tokens`` and ``kv`` tensors, or ``<name>.tokens`` and
``<name>.kv`` pairs; ``kv`` in LMCache's ``[2, L, T, H*D]`` or MLA ``[1, L, T, D]`` layout) or
from a local transformers model directory and text files.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from kvstore.cli.common import (
    EXIT_FAILED, EXIT_USAGE, add_json_argument, add_store_arguments, human_bytes, load_extra_config, print_json,
    print_table,
)
from kvstore.errors import ConfigError

_SIZE_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def register(sub) -> None:
    p = sub.add_parser("dump", help="write prompts' KV caches into a store as LMCache chunks")
    _add_url(p)
    _add_prompt_arguments(p)
    add_json_argument(p)
    p.set_defaults(handler=cmd_dump)

    kv = sub.add_parser("kv", help="inspect and manage dumped KV chunks").add_subparsers(dest="kv_command", metavar="COMMAND")
    kv.required = True
    p = kv.add_parser("ls", help="list chunks")
    _add_url(p)
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("-l", "--long", action="store_true", help="read each chunk's metadata too (token counts; one HEAD each)")
    add_json_argument(p)
    p.set_defaults(handler=cmd_ls)

    p = kv.add_parser("stat", help="chunks and bytes per model")
    _add_url(p)
    p.add_argument("prefix", nargs="?", default="")
    add_json_argument(p)
    p.set_defaults(handler=cmd_stat)

    p = kv.add_parser("verify", help="check that every chunk of some prompts is stored, whole and intact")
    _add_url(p)
    _add_prompt_arguments(p)
    p.add_argument("--no-read", action="store_true", help="check presence and size only, without reading")
    add_json_argument(p)
    p.set_defaults(handler=cmd_verify)

    p = kv.add_parser("gc", help="remove old chunks, oldest first (a dry run unless --delete)")
    _add_url(p)
    p.add_argument("--older-than", metavar="AGE", help="remove chunks written longer ago than AGE (90s, 12h, 7d, 2w)")
    p.add_argument("--max-bytes", metavar="SIZE", help="then remove the oldest until at most SIZE remain (500M, 20GiB)")
    p.add_argument("--prefix", default="", help="only chunks under this prefix")
    p.add_argument("--delete", action="store_true", help="really delete (default: only report)")
    add_json_argument(p)
    p.set_defaults(handler=cmd_gc)


def _add_url(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="store URL (s3://..., file:///..., a directory, memory://); or remote_url/kvstore_url of -c")
    add_store_arguments(p, url=False)


def _add_prompt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name as LMCache sees it (part of every chunk key)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="FILE.safetensors", help="tokens and KV tensors")
    src.add_argument("--hf-model", metavar="DIR", help="a local transformers model directory (run on CPU)")
    p.add_argument("--text", metavar="FILE", action="append", default=[], help="a prompt for --hf-model (repeatable)")
    p.add_argument("--dtype", help="KV dtype (default: the tensors' or the model's)")
    p.add_argument("--chunk-size", type=int, default=256, help="LMCache chunk_size (default 256)")
    p.add_argument("--kv-heads", type=int, help="KV heads, for --input (bytes and keys do not depend on it)")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--worker-id", type=int, default=0)
    p.add_argument("--full-chunks-only", action="store_true",
                   help="leave out a short last chunk, as LMCache does unless save_unfull_chunk is set")


def _open(args: argparse.Namespace):
    import kvstore

    return kvstore.open(args.url, load_extra_config(args.config, args.set))


def _quiet_lmcache(args: argparse.Namespace) -> None:
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "INFO" if args.verbose > 1 else "ERROR")
    if os.environ.get("PYTHONHASHSEED") is None:
        print("kvstore: note: PYTHONHASHSEED is not set. LMCache asks every process sharing a cache to run with "
              "PYTHONHASHSEED=0; chunk keys of token ids do not depend on it, but export it to be safe.", file=sys.stderr)


# -- prompts -----------------------------------------------------------------------------------
def _prompts(args: argparse.Namespace, *, with_kv: bool):
    """``(layout, [(name, tokens, kv or None)])`` from --input or --hf-model."""
    if args.input:
        return _prompts_from_file(args)
    return _prompts_from_model(args, with_kv)


def _prompts_from_file(args: argparse.Namespace):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from kvstore.kv import KVLayout

    try:
        tensors = load_file(args.input)
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"cannot read {args.input}: {exc}") from None
    names = sorted({k[: -len(".tokens")] for k in tensors if k.endswith(".tokens")})
    pairs = [("", tensors.get("tokens"), tensors.get("kv"))] if "tokens" in tensors else \
        [(n, tensors[n + ".tokens"], tensors.get(n + ".kv")) for n in names]
    if not pairs or any(kv is None for _, _, kv in pairs):
        raise ConfigError(f"{args.input} must hold 'tokens' and 'kv' tensors, or '<name>.tokens' and '<name>.kv' pairs")
    kv = pairs[0][2]
    if kv.ndim != 4 or kv.shape[0] not in (1, 2):
        raise ConfigError(f"'kv' tensors must be [2, L, T, H*D] (or [1, L, T, D] for MLA), got {list(kv.shape)}")
    heads = args.kv_heads or 1
    if kv.shape[3] % heads:
        raise ConfigError(f"--kv-heads {heads} does not divide the hidden size {kv.shape[3]}")
    layout = KVLayout(kv.shape[1], heads, kv.shape[3] // heads, args.dtype or str(kv.dtype), args.chunk_size,
                      "KV_2LTD" if kv.shape[0] == 2 else "KV_MLA_FMT")
    return layout, [(name, t.reshape(-1).tolist(), kv) for name, t, kv in pairs]


def _prompts_from_model(args: argparse.Namespace, with_kv: bool):
    from transformers import AutoConfig

    from kvstore.kv import KVLayout

    if not args.text:
        raise ConfigError("--hf-model needs at least one --text FILE")
    config = AutoConfig.from_pretrained(args.hf_model, local_files_only=True)
    layout = KVLayout.from_hf_config(config, dtype=args.dtype or getattr(config, "torch_dtype", None) or "float32",
                                     chunk_size=args.chunk_size)
    encode = _tokenizer(args.hf_model)
    texts = []
    for path in args.text:
        with open(path, encoding="utf-8") as f:
            texts.append((path, encode(f.read())))
    if not with_kv:
        return layout, [(name, ids, None) for name, ids in texts]
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.hf_model, local_files_only=True, dtype=layout.torch_dtype).eval()
    prompts = []
    for name, ids in texts:
        with torch.no_grad():
            prompts.append((name, ids, model(torch.tensor([ids]), use_cache=True).past_key_values))
    return layout, prompts


def _tokenizer(model_dir: str):
    """The model's own tokenizer; without one, a prompt's UTF-8 bytes are its token ids."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        return lambda text: tokenizer(text)["input_ids"]
    except (OSError, ValueError, TypeError):
        print(f"kvstore: no tokenizer in {model_dir}: using the text's UTF-8 bytes as token ids", file=sys.stderr)
        return lambda text: list(text.encode("utf-8"))


def _key_args(args: argparse.Namespace) -> dict:
    return {"model": args.model, "world_size": args.world_size, "worker_id": args.worker_id,
            "save_unfull_chunk": not args.full_chunks_only}


# -- commands ----------------------------------------------------------------------------------
class _ProgressBar:
    """Chunks, bytes and rate on one self-rewriting stderr line; silent unless stderr is a terminal."""

    def __init__(self, total_chunks: int) -> None:
        self.total = total_chunks
        self.enabled = sys.stderr.isatty()
        self.started = time.perf_counter()
        self.base_chunks = self.base_bytes = 0

    def next_prompt(self, report) -> None:
        self.base_chunks += report.chunks
        self.base_bytes += report.bytes

    def __call__(self, chunks: int, nbytes: int) -> None:
        if not self.enabled:
            return
        done, written = self.base_chunks + chunks, self.base_bytes + nbytes
        rate = written / max(time.perf_counter() - self.started, 1e-9)
        width = 30
        filled = int(width * done / max(self.total, 1))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} chunks  "
                         f"{human_bytes(written)}  {human_bytes(rate)}/s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def cmd_dump(args: argparse.Namespace) -> int:
    _quiet_lmcache(args)
    from kvstore.kv import dump, hash_seed

    layout, prompts = _prompts(args, with_kv=True)
    chunk = layout.chunk_size
    bar = _ProgressBar(sum(-(-len(t) // chunk) for _, t, _ in prompts))
    rows = []
    with _open(args) as store:
        try:
            for name, tokens, kv in prompts:
                report = dump(store, tokens, kv, layout=layout, progress=bar, **_key_args(args))
                bar.next_prompt(report)
                rows.append({"prompt": name, "tokens": len(tokens), "written": report.written, "skipped": report.skipped,
                             "bytes": report.bytes, "seconds": round(report.seconds, 6), "gbps": round(report.gbps, 6)})
        finally:
            bar.close()
    if args.json:
        print_json({"layout": layout.__dict__, "hash_seed": hash_seed(), "prompts": rows})
    else:
        print_table(("prompt", "tokens", "written", "skipped", "bytes", "GB/s"),
                    [(r["prompt"] or "-", r["tokens"], r["written"], r["skipped"], human_bytes(r["bytes"]),
                      f"{r['gbps']:.3f}") for r in rows])
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    _quiet_lmcache(args)
    from kvstore.kv import verify

    layout, prompts = _prompts(args, with_kv=False)
    results = []
    with _open(args) as store:
        for name, tokens, _ in prompts:
            report = verify(store, tokens, layout=layout, read=not args.no_read, **_key_args(args))
            results.append((name, len(tokens), report))
    ok = all(r.ok for _, _, r in results)
    if args.json:
        print_json({"ok": ok, "prompts": [{"prompt": n, "tokens": t, "cached_tokens": r.cached_tokens, "counts": r.counts(),
                                           "problems": [c.__dict__ for c in r.chunks if c.status != "ok"]}
                                          for n, t, r in results]})
    else:
        print_table(("prompt", "tokens", "cached", "chunks"),
                    [(n or "-", t, r.cached_tokens, " ".join(f"{k}={v}" for k, v in sorted(r.counts().items())))
                     for n, t, r in results])
        for _, _, r in results:
            for c in r.chunks:
                if c.status != "ok":
                    print(f"{c.status}: tokens {c.start}-{c.end} {c.name} {c.detail}".rstrip(), file=sys.stderr)
    return 0 if ok else EXIT_FAILED


def cmd_ls(args: argparse.Namespace) -> int:
    from kvstore.kv import scan

    with _open(args) as store:
        chunks = list(scan(store, args.prefix, with_metadata=args.long))
    if args.json:
        print_json([c.__dict__ for c in chunks])
    else:
        print_table(("tokens", "size", "modified", "key"),
                    [("-" if c.tokens is None else c.tokens, c.size, _when(c.last_modified), c.key) for c in chunks])
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    from kvstore.kv import scan

    models: dict[tuple, dict] = {}
    with _open(args) as store:
        for c in scan(store, args.prefix):
            m = models.setdefault((c.model, c.world_size, c.worker_id, c.dtype),
                                  {"chunks": 0, "bytes": 0, "oldest": None, "newest": None})
            m["chunks"] += 1
            m["bytes"] += c.size
            if c.last_modified is not None:
                m["oldest"] = min(m["oldest"] or c.last_modified, c.last_modified)
                m["newest"] = max(m["newest"] or c.last_modified, c.last_modified)
    rows = [{"model": k[0], "world_size": k[1], "worker_id": k[2], "dtype": k[3], **v} for k, v in sorted(models.items())]
    if args.json:
        print_json(rows)
    else:
        print_table(("model", "rank", "dtype", "chunks", "bytes", "newest"),
                    [(r["model"], f"{r['worker_id']}/{r['world_size']}", r["dtype"], r["chunks"],
                      human_bytes(r["bytes"]), _when(r["newest"])) for r in rows])
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from kvstore.kv import gc

    if args.older_than is None and args.max_bytes is None:
        print("kvstore kv gc: give --older-than and/or --max-bytes", file=sys.stderr)
        return EXIT_USAGE
    with _open(args) as store:
        report = gc(store, older_than=None if args.older_than is None else parse_age(args.older_than),
                    max_bytes=None if args.max_bytes is None else parse_size(args.max_bytes),
                    prefix=args.prefix, dry_run=not args.delete)
    if args.json:
        print_json({"dry_run": report.dry_run, "removed": [c.key for c in report.removed],
                    "removed_bytes": report.removed_bytes, "kept": report.kept, "kept_bytes": report.kept_bytes})
    else:
        verb = "would remove" if report.dry_run else "removed"
        for c in report.removed:
            print(f"{verb} {c.key}")
        print(f"{verb} {len(report.removed)} chunks ({human_bytes(report.removed_bytes)}); "
              f"{report.kept} chunks ({human_bytes(report.kept_bytes)}) kept" + ("; run with --delete to remove" if report.dry_run else ""))
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


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
