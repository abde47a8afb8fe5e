"""End-to-end demo: dump a real model's KV cache, then read it back from a fresh process.

    python -m kvstore.demo [URL]      (default: ./.kvstore-demo)

1. Builds a tiny Llama-architecture model with random weights (nothing is downloaded), runs it
   over a few prompts (their UTF-8 bytes are the token ids) and dumps each prompt's
   ``past_key_values`` into the store with ``kvstore.kv.dump``.
2. Starts a fresh Python process that (a) loads every prompt back with ``kvstore.kv.load`` and
   compares it bit for bit with what the model produced, and (b) builds a real LMCache engine
   whose remote storage is the kvstore plugin, asks it to look up the same tokens, and reads
   each chunk back through LMCache's storage manager.

Exit status 0 only when every chunk matched and every lookup was a full hit. Chunk keys come
from LMCache's hash, so both processes run with PYTHONHASHSEED fixed (0 unless set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvstore.kv import KVLayout

MODEL = "kvstore-demo/tiny-llama"
CHUNK_SIZE = 64
PROMPTS = (
    "Object stores are slow to start and fast to stream. " * 6,
    "Object stores are slow to start and fast to stream. " * 6 + "A longer prompt shares its first chunks. " * 5,
    "KV caches are large: layers x heads x tokens x head size x two. " * 9,
)


def _tokens(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def _model() -> tuple[Any, Any]:
    import torch
    from transformers import LlamaForCausalLM

    config = _config()
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config)  # transformers types .to() through a decorator that loses its signature
    return config, model.to(torch.bfloat16).eval()


def _layout(config: Any) -> KVLayout:
    import torch

    from kvstore.kv import KVLayout

    return KVLayout.from_hf_config(config, dtype=torch.bfloat16, chunk_size=CHUNK_SIZE)


def produce(url: str, reference_path: str) -> list[dict[str, Any]]:
    """Run the model, dump every prompt, save the reference tensors for the checking process."""
    import torch
    from safetensors.torch import save_file

    import kvstore
    from kvstore.kv import dump

    config, model = _model()
    layout = _layout(config)
    rows, reference = [], {}
    with kvstore.open(url) as store:
        for i, text in enumerate(PROMPTS):
            ids = _tokens(text)
            with torch.no_grad():
                out = model(torch.tensor([ids]), use_cache=True)
            report = dump(store, ids, out.past_key_values, model=MODEL, layout=layout)
            cache = out.past_key_values
            reference[f"p{i}"] = torch.stack([torch.stack([layer.keys[0].transpose(0, 1).reshape(len(ids), -1),
                                                           layer.values[0].transpose(0, 1).reshape(len(ids), -1)])
                                              for layer in cache.layers], dim=1).contiguous()
            rows.append({"prompt": i, "tokens": len(ids), "written": report.written, "skipped": report.skipped,
                         "bytes": report.bytes, "gbps": report.gbps})
    save_file(reference, reference_path)
    return rows


def check(url: str, reference_path: str) -> list[dict[str, Any]]:
    """In a fresh process: load every prompt back and look it up through a real LMCache engine."""
    import torch
    from safetensors.torch import load_file

    import kvstore
    from kvstore.kv import chunk_keys, load
    from kvstore.kv.keys import lmcache_metadata

    layout = _layout(_config())
    reference = load_file(reference_path)
    engine, builder = _lmcache_engine(url, lmcache_metadata(layout, model=MODEL))
    from lmcache.utils import CacheEngineKey

    rows = []
    try:
        with kvstore.open(url) as store:
            for i, text in enumerate(PROMPTS):
                ids = _tokens(text)
                started = time.perf_counter()
                loaded = load(store, ids, model=MODEL, layout=layout)
                seconds = time.perf_counter() - started
                exact = loaded is not None and torch.equal(loaded, reference[f"p{i}"])
                hit = engine.lookup(tokens=ids)
                engine_exact = True
                for c in chunk_keys(ids, model=MODEL, layout=layout):
                    memory_obj = engine.storage_manager.get(CacheEngineKey.from_string(c.key))
                    engine_exact &= memory_obj is not None and torch.equal(memory_obj.tensor, reference[f"p{i}"][:, :, c.start:c.end])
                    if memory_obj is not None:
                        memory_obj.ref_count_down()
                rows.append({"prompt": i, "tokens": len(ids), "load_exact": exact, "load_gbps":
                             (0 if loaded is None else loaded.numel() * loaded.element_size()) / seconds / 1e9,
                             "lmcache_hit": hit, "lmcache_exact": engine_exact})
    finally:
        builder.destroy("kvstore-demo")
    return rows


def _lmcache_engine(url: str, metadata: Any) -> tuple[Any, Any]:
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig

    config = LMCacheEngineConfig.from_dict({
        "chunk_size": CHUNK_SIZE, "save_unfull_chunk": True, "local_cpu": True, "max_local_cpu_size": 0.2,
        "remote_storage_plugins": ["kvstore"],
        "extra_config": {"remote_storage_plugin.kvstore.module_path": "kvstore.lmcache",
                         "remote_storage_plugin.kvstore.class_name": "KVStoreConnectorAdapter",
                         "kvstore_url": url},
    })
    engine = LMCacheEngineBuilder.get_or_create("kvstore-demo", config, metadata, None, None, None)
    engine.post_init()
    return engine, LMCacheEngineBuilder


def _print_table(dumped: list[dict[str, Any]], checked: list[dict[str, Any]]) -> None:
    from kvstore.cli.common import human_bytes, print_table

    rows = []
    for d, c in zip(dumped, checked):
        chunks = d["written"] + d["skipped"]
        rows.append((d["prompt"], d["tokens"], f"{chunks} ({d['skipped']} skipped)", human_bytes(d["bytes"]),
                     f"{d['gbps']:.3f}", f"{c['load_gbps']:.3f}", "yes" if c["load_exact"] else "NO",
                     f"{c['lmcache_hit']}/{d['tokens']}", "yes" if c["lmcache_exact"] else "NO"))
    print_table(("prompt", "tokens", "chunks", "written", "dump GB/s", "load GB/s", "bit-exact", "LMCache hit",
                 "LMCache bytes"), rows)


def main(argv: list[str] | None = None) -> int:
    """Dump, then check from a fresh process; 0 when everything matched."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--check"]:
        print(json.dumps(check(args[1], args[2])))
        return 0
    url = args[0] if args else "./.kvstore-demo"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvstore-demo-") as scratch:
        reference = os.path.join(scratch, "reference.safetensors")
        dumped = produce(url, reference)
        child = subprocess.run([sys.executable, "-m", "kvstore.demo", "--check", url, reference],
                               stdout=subprocess.PIPE, env={**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")})
        if child.returncode != 0:
            print(f"kvstore demo: the checking process failed (exit {child.returncode})", file=sys.stderr)
            return 1
        checked = json.loads(child.stdout.decode().strip().splitlines()[-1])
    print(f"store: {url}   model: {MODEL} (2 layers, bf16, chunks of {CHUNK_SIZE} tokens)")
    _print_table(dumped, checked)
    ok = all(c["load_exact"] and c["lmcache_exact"] and c["lmcache_hit"] == d["tokens"] for d, c in zip(dumped, checked))
    print(f"{'OK' if ok else 'FAILED'}: {len(dumped)} prompts dumped, reloaded bit-exact in a fresh process and "
          f"{'fully hit' if ok else 'NOT all hit'} by LMCache ({time.perf_counter() - started:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")  # LMCache logs every engine step at INFO
    if os.environ.get("PYTHONHASHSEED") is None:  # LMCache's keys use hash(); fix the seed as it asks
        os.execve(sys.executable, [sys.executable, "-m", "kvstore.demo", *sys.argv[1:]],
                  {**os.environ, "PYTHONHASHSEED": "0"})
    sys.exit(main())
