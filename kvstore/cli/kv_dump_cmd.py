"""``kvstore dump`` and ``kvstore kv verify``: prompts in, chunks written or checked.

Prompts come from a safetensors file (``tokens`` and ``kv`` tensors, or ``<name>.tokens`` and
``<name>.kv`` pairs; ``kv`` in LMCache's ``[2, L, T, H*D]`` or MLA ``[1, L, T, D]`` layout) or
from a local transformers model directory and text files, or (``--corpus``, in ``kv_corpus_cmd``)
a whole corpus of them. With ``-c`` naming an LMCache config
file, the settings that shape chunk keys and bytes come from it, read by LMCache's own loader.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Protocol, cast

from kvstore.cli.common import EXIT_FAILED, human_bytes, load_extra_config, print_json, print_table
from kvstore.errors import ConfigError

if TYPE_CHECKING:
    from kvstore.kv import KVLayout
    from kvstore.store import KVStore

DEFAULT_CHUNK_SIZE = 256

Prompts = list[tuple[str, list[int], Any]]  # (name, token ids, KV cache or None)


class ProgressBar(Protocol):
    """What ``progress_bar`` returns: ``update(n, total=None)``, with the tqdm bar as ``.bar``."""

    bar: Any

    def __call__(self, n: int = 1, total: int | None = None) -> None: ...


def add_prompt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name as LMCache sees it (part of every chunk key)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="FILE.safetensors", help="tokens and KV tensors")
    src.add_argument("--hf-model", metavar="DIR", help="a local transformers model directory (run on CPU, or with --corpus on a "
                     "GPU when there is one)")
    p.add_argument("--text", metavar="FILE", action="append", default=[], help="a prompt for --hf-model (repeatable)")
    p.add_argument("--dtype", help="KV dtype (default: the tensors' or the model's)")
    p.add_argument("--chunk-size", type=int, help="LMCache chunk_size (default: the -c LMCache file's, else 256)")
    p.add_argument("--kv-heads", type=int, help="KV heads, for --input (bytes and keys do not depend on it)")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--worker-id", type=int, default=0)
    unfull = p.add_mutually_exclusive_group()
    unfull.add_argument("--full-chunks-only", dest="save_unfull_chunk", action="store_const", const=False,
                        help="leave out a short last chunk (LMCache's save_unfull_chunk: false)")
    unfull.add_argument("--save-unfull-chunk", dest="save_unfull_chunk", action="store_const", const=True,
                        help="keep a short last chunk (default without an LMCache file)")


def open_store(args: argparse.Namespace) -> KVStore:
    import kvstore

    return kvstore.open(args.url, load_extra_config(args.config, args.set))


def progress_bar(total: int, unit: str = "chunk") -> ProgressBar:
    """A thread-safe ``update(n, total=None)`` on a tqdm bar on stderr, drawn only when stderr is a terminal."""
    from tqdm import tqdm

    bar = tqdm(total=total or None, unit=unit, file=sys.stderr, disable=not sys.stderr.isatty(), dynamic_ncols=True,
               leave=False)
    lock = threading.Lock()

    def update(n: int = 1, total: int | None = None) -> None:
        with lock:
            if total is not None and bar.total != total:
                bar.total = total
            bar.update(n)

    update.bar = bar  # type: ignore[attr-defined]
    return cast(ProgressBar, update)


def _quiet_lmcache(args: argparse.Namespace) -> None:
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "INFO" if args.verbose > 1 else "ERROR")
    if os.environ.get("PYTHONHASHSEED") is None:
        print("kvstore: note: PYTHONHASHSEED is not set. LMCache asks every process sharing a cache to run with "
              "PYTHONHASHSEED=0; chunk keys of token ids do not depend on it, but export it to be safe.", file=sys.stderr)


# -- the LMCache config file -------------------------------------------------------------------
def lmcache_engine_config(path: str | None) -> Any:
    """The file's ``LMCacheEngineConfig`` (LMCache's own loader) when it is an LMCache config, else None."""
    if not path:
        return None
    import yaml

    try:
        with open(path) as f:
            loaded = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None  # load_extra_config reports it, with the reason
    from lmcache.v1.config import LMCacheEngineConfig

    if not isinstance(loaded, dict):
        return None
    defaults = LMCacheEngineConfig.from_defaults()
    if not any(k in _LMCACHE_KEYS or hasattr(defaults, k) for k in loaded):
        return None  # a plain extra_config file
    try:
        config = LMCacheEngineConfig.from_file(path)
    except Exception as exc:  # LMCache's loader raises what it likes; keep its message and cause
        raise ConfigError(f"LMCache cannot load {path}: {exc}") from exc
    if getattr(config, "remote_serde", "naive") not in (None, "naive"):
        raise ConfigError(f"{path}: remote_serde: {config.remote_serde} changes the bytes LMCache stores; "
                          "kvstore dump writes raw (naive) chunks only")
    if getattr(config, "use_layerwise", False):
        raise ConfigError(f"{path}: use_layerwise: true stores one object per layer; kvstore dump writes whole chunks")
    return config


_LMCACHE_KEYS = {"chunk_size", "save_unfull_chunk", "remote_url", "extra_config", "local_cpu", "max_local_cpu_size",
                 "remote_storage_plugins", "storage_plugins", "pre_caching_hash_algorithm", "remote_serde"}


def key_settings(args: argparse.Namespace) -> tuple[int, bool, Any]:
    """``(chunk_size, save_unfull_chunk, engine_config)``: flags over the LMCache file over defaults.

    A flag that overrides a different value in the file says so on stderr.
    """
    config = lmcache_engine_config(args.config)
    chunk, unfull = DEFAULT_CHUNK_SIZE, True
    if config is not None:
        chunk, unfull = int(config.chunk_size), bool(config.save_unfull_chunk)
    for flag, given, name, current in (("--chunk-size", args.chunk_size, "chunk_size", chunk),
                                       ("--save-unfull-chunk" if args.save_unfull_chunk else "--full-chunks-only",
                                        args.save_unfull_chunk, "save_unfull_chunk", unfull)):
        if given is not None and config is not None and given != current:
            print(f"kvstore: note: {flag} overrides {name}: {current} of {args.config}", file=sys.stderr)
    if args.chunk_size is not None:
        chunk = args.chunk_size
    if args.save_unfull_chunk is not None:
        unfull = args.save_unfull_chunk
    if chunk < 1:
        raise ConfigError(f"chunk_size must be positive, got {chunk}")
    return chunk, unfull, config


# -- prompts -----------------------------------------------------------------------------------
def _prompts(args: argparse.Namespace, chunk_size: int, *, with_kv: bool) -> tuple[KVLayout, Prompts]:
    """``(layout, [(name, tokens, kv or None)])`` from --input or --hf-model."""
    if args.input:
        return _prompts_from_file(args, chunk_size)
    return _prompts_from_model(args, chunk_size, with_kv)


def _prompts_from_file(args: argparse.Namespace, chunk_size: int) -> tuple[KVLayout, Prompts]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from kvstore.kv import KVLayout

    try:
        tensors = load_file(args.input)
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"cannot read {args.input}: {exc}") from exc
    names = sorted({k[: -len(".tokens")] for k in tensors if k.endswith(".tokens")})
    found = [("", tensors["tokens"], tensors.get("kv"))] if "tokens" in tensors else \
        [(n, tensors[n + ".tokens"], tensors.get(n + ".kv")) for n in names]
    pairs = [(n, t, kv) for n, t, kv in found if kv is not None]
    if not pairs or len(pairs) != len(found):
        raise ConfigError(f"{args.input} must hold 'tokens' and 'kv' tensors, or '<name>.tokens' and '<name>.kv' pairs")
    kv = pairs[0][2]
    if kv.ndim != 4 or kv.shape[0] not in (1, 2):
        raise ConfigError(f"'kv' tensors must be [2, L, T, H*D] (or [1, L, T, D] for MLA), got {list(kv.shape)}")
    heads = args.kv_heads or 1
    if kv.shape[3] % heads:
        raise ConfigError(f"--kv-heads {heads} does not divide the hidden size {kv.shape[3]}")
    layout = KVLayout(kv.shape[1], heads, kv.shape[3] // heads, args.dtype or str(kv.dtype), chunk_size,
                      "KV_2LTD" if kv.shape[0] == 2 else "KV_MLA_FMT")
    return layout, [(name, t.reshape(-1).tolist(), kv) for name, t, kv in pairs]


def _prompts_from_model(args: argparse.Namespace, chunk_size: int, with_kv: bool) -> tuple[KVLayout, Prompts]:
    from kvstore.kv.corpus_model import HFModel

    if not args.text:
        raise ConfigError("--hf-model needs at least one --text FILE")
    model = HFModel(args.hf_model, dtype=args.dtype, chunk_size=chunk_size, device="cpu")
    texts: list[tuple[str, list[int]]] = []
    for path in args.text:
        with open(path, encoding="utf-8") as f:
            texts.append((path, model.encode(f.read())))
    return model.layout, [(name, ids, model.prefill([ids])[0] if with_kv else None) for name, ids in texts]


def _key_args(args: argparse.Namespace, save_unfull_chunk: bool, engine_config: Any) -> dict[str, Any]:
    return {"model": args.model, "world_size": args.world_size, "worker_id": args.worker_id,
            "save_unfull_chunk": save_unfull_chunk, "engine_config": engine_config}


# -- commands ----------------------------------------------------------------------------------
def cmd_dump(args: argparse.Namespace) -> int:
    _quiet_lmcache(args)
    if args.corpus:
        from kvstore.cli.kv_corpus_cmd import cmd_dump_corpus

        return cmd_dump_corpus(args)
    from kvstore.kv import dump, hash_seed

    chunk, unfull, engine_config = key_settings(args)
    layout, prompts = _prompts(args, chunk, with_kv=True)
    update = progress_bar(sum(-(-len(t) // chunk) for _, t, _ in prompts))
    rows: list[dict[str, Any]] = []
    with open_store(args) as store:
        try:
            for name, tokens, kv in prompts:
                done = [0, 0]

                def progress(chunks: int, nbytes: int, done: list[int] = done) -> None:
                    update(chunks - done[0])
                    done[0] = chunks
                    update.bar.set_postfix_str(human_bytes(nbytes), refresh=False)

                report = dump(store, tokens, kv, layout=layout, progress=progress, **_key_args(args, unfull, engine_config))
                update(-(-len(tokens) // chunk) - done[0])  # a dropped short last chunk still counts as done
                rows.append({"prompt": name, "tokens": len(tokens), "written": report.written, "skipped": report.skipped,
                             "bytes": report.bytes, "seconds": round(report.seconds, 6), "gbps": round(report.gbps, 6)})
        finally:
            update.bar.close()
    if args.json:
        print_json({"layout": layout.__dict__, "save_unfull_chunk": unfull, "hash_seed": hash_seed(), "prompts": rows})
    else:
        print_table(("prompt", "tokens", "written", "skipped", "bytes", "GB/s"),
                    [(r["prompt"] or "-", r["tokens"], r["written"], r["skipped"], human_bytes(r["bytes"]),
                      f"{r['gbps']:.3f}") for r in rows])
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    _quiet_lmcache(args)
    from kvstore.kv import verify

    chunk, unfull, engine_config = key_settings(args)
    layout, prompts = _prompts(args, chunk, with_kv=False)
    per_prompt = (1 if args.no_read else 2)
    update = progress_bar(per_prompt * sum(-(-len(t) // chunk) for _, t, _ in prompts))
    results = []
    with open_store(args) as store:
        try:
            for name, tokens, _ in prompts:
                report = verify(store, tokens, layout=layout, read=not args.no_read, progress=update,
                                **_key_args(args, unfull, engine_config))
                results.append((name, len(tokens), report))
        finally:
            update.bar.close()
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
