"""Offline KV dumping: bit-exact round trips, LMCache's own keys and bytes, resumable dumps."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lmcache")

import kvstore  # noqa: E402
from kvstore.backends.base import as_byte_view  # noqa: E402
from kvstore.errors import ConfigError, IntegrityError, StoreUnavailable  # noqa: E402
from kvstore.kv import KVLayout, chunk_keys, chunk_metadata, dump, gc, load, load_chunks, scan, verify  # noqa: E402
from kvstore.layers.base import Layer  # noqa: E402

pytestmark = pytest.mark.lmcache

MODEL = "org/tiny-model"
TOKENS = 37  # chunks of 8: four full ones and a short one of 5


def _tokens(n: int = TOKENS, seed: int = 0) -> list[int]:
    return torch.randint(0, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _kv(layout: KVLayout, n: int = TOKENS) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(layout.chunk_shape(n), generator=g).to(layout.torch_dtype)


@pytest.fixture(params=["memory", "file", "moto"])
def store(request, tmp_path, s3_servers, unique_name):
    if request.param == "memory":
        url, extra = f"memory://{unique_name('kv')}", {}
    elif request.param == "file":
        url, extra = str(tmp_path / "store"), {}
    else:
        server = s3_servers.get("moto")
        bucket = unique_name("kv")
        server.create_bucket(bucket)
        url, extra = server.url(bucket, "dumps"), server.extra_config()
    with kvstore.open(url, extra) as s:
        yield s


LAYOUTS = [
    KVLayout(2, 2, 16, "float16", chunk_size=8),
    KVLayout(2, 2, 16, "bfloat16", chunk_size=8),
    KVLayout(3, 1, 8, "float32", chunk_size=8),
    KVLayout(2, 1, 24, "bfloat16", chunk_size=8, fmt="KV_MLA_FMT"),
]


@pytest.mark.servers
@pytest.mark.parametrize("layout", LAYOUTS, ids=["fp16", "bf16", "fp32", "mla-bf16"])
def test_round_trip_is_bit_exact(store, layout):
    tokens, kv = _tokens(), _kv(layout)
    report = dump(store, tokens, kv, model=MODEL, layout=layout)
    assert (report.written, report.skipped) == (5, 0)
    assert report.bytes == kv.numel() * kv.element_size()
    back = load(store, tokens, model=MODEL, layout=layout)
    assert back.dtype == kv.dtype and back.shape == kv.shape
    assert as_byte_view(back).tobytes() == as_byte_view(kv.contiguous()).tobytes()
    chunks = load_chunks(store, tokens, model=MODEL, layout=layout)
    assert [c.shape[2] for c in chunks] == [8, 8, 8, 8, 5]
    names = [c.name for c in chunk_keys(tokens, model=MODEL, layout=layout)]
    info = store.stat(names[-1])
    assert info.size == layout.chunk_bytes(5) and info.metadata["lmcache-tokens"] == "5"
    assert verify(store, tokens, model=MODEL, layout=layout).ok


def test_every_input_form_gives_the_same_bytes():
    layout = KVLayout(2, 2, 16, "bfloat16", chunk_size=8)
    kv = _kv(layout)
    per_layer_bhtd = [(kv[0, layer].view(TOKENS, 2, 16).transpose(0, 1)[None], kv[1, layer].view(TOKENS, 2, 16).transpose(0, 1)[None])
                      for layer in range(2)]
    per_layer_thd = [(kv[0, layer].view(TOKENS, 2, 16), kv[1, layer].view(TOKENS, 2, 16)) for layer in range(2)]
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(per_layer_bhtd):
        cache.update(k, v, layer)
    tokens = _tokens()
    with kvstore.open(f"memory://{uuid.uuid4().hex}") as s:
        for form in (kv, per_layer_bhtd, per_layer_thd, cache, kv.float()):  # a float32 source is cast once
            for name in list(s.list()):
                s.delete(name)
            assert dump(s, tokens, form, model=MODEL, layout=layout).written == 5
            assert torch.equal(load(s, tokens, model=MODEL, layout=layout), kv)


def test_bad_input_is_a_clear_error():
    layout = KVLayout(2, 2, 16, "bfloat16", chunk_size=8)
    with kvstore.open(f"memory://{uuid.uuid4().hex}") as s:
        with pytest.raises(ConfigError, match="covers 37 tokens but 36"):
            dump(s, _tokens(36), _kv(layout), model=MODEL, layout=layout)
        with pytest.raises(ConfigError, match="shape"):
            dump(s, _tokens(), torch.zeros(2, 3, TOKENS, 32), model=MODEL, layout=layout)
        with pytest.raises(ConfigError, match="layers"):
            dump(s, _tokens(), [(torch.zeros(TOKENS, 2, 16),) * 2], model=MODEL, layout=layout)
    with pytest.raises(ConfigError, match="dtype"):
        KVLayout(2, 2, 16, "complex64")


def test_keys_and_bytes_are_what_lmcache_itself_writes(tmp_path):
    """A real LMCache engine with the kvstore plugin stores the same chunks: same names, same bytes, and it hits ours."""
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig

    from kvstore.kv.keys import lmcache_metadata

    layout = KVLayout(2, 2, 16, "bfloat16", chunk_size=8)
    tokens, kv = _tokens(), _kv(layout)
    theirs, ours = str(tmp_path / "lmcache"), str(tmp_path / "ours")
    config = LMCacheEngineConfig.from_dict({
        "chunk_size": 8, "save_unfull_chunk": True, "local_cpu": True, "max_local_cpu_size": 0.05,
        "remote_storage_plugins": ["kvstore"],
        "extra_config": {"remote_storage_plugin.kvstore.module_path": "kvstore.lmcache",
                         "remote_storage_plugin.kvstore.class_name": "KVStoreConnectorAdapter", "kvstore_url": theirs},
    })
    engine = LMCacheEngineBuilder.get_or_create("kv-test", config, lmcache_metadata(layout, model=MODEL), None, None, None)
    try:
        engine.post_init()
        manager = engine.storage_manager
        keys, objs = [], []
        for start, end, key in engine.token_database.process_tokens(tokens=tokens):
            obj = manager.allocate(torch.Size(layout.chunk_shape(end - start)), layout.torch_dtype)
            obj.tensor.copy_(kv[:, :, start:end])
            keys.append(key)
            objs.append(obj)
        manager.batched_put(keys, objs, location="RemoteBackend-kvstore")
        with kvstore.open(theirs) as lm_store:
            _wait_for(lambda: _count(lm_store) == len(keys))
            with kvstore.open(ours) as our_store:
                dump(our_store, tokens, kv, model=MODEL, layout=layout)
                assert sorted(our_store.list()) == sorted(lm_store.list())
                for name in our_store.list():
                    assert our_store.get(name) == lm_store.get(name)
                    # The adapter cannot know a chunk's absolute index, only its predecessor.
                    ours = dict(our_store.stat(name).metadata)
                    assert ours.pop("lmcache-chunk-index").isdigit()
                    assert ours == lm_store.stat(name).metadata
        assert engine.lookup(tokens=tokens) == TOKENS
    finally:
        LMCacheEngineBuilder.destroy("kv-test")


def _count(store) -> int:
    """Objects in a store that LMCache is still writing; its root exists only after the first write."""
    try:
        return len(list(store.list()))
    except kvstore.BucketNotFound:
        return 0


def _wait_for(condition, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_metadata_matches_the_lmcache_adapter():
    from kvstore.lmcache import chunks

    for layout in LAYOUTS:
        tensor = torch.empty(layout.chunk_shape(5), dtype=layout.torch_dtype)
        from lmcache.v1.memory_management import MemoryFormat

        theirs = chunks.ChunkLayout([tensor.shape], [tensor.dtype], MemoryFormat[layout.fmt]).metadata()
        assert chunk_metadata(layout, 5) == theirs


def test_keys_do_not_depend_on_the_hash_seed():
    """LMCache hashes (int, tuple of ints, ()) with hash(): CPython does not randomise that."""
    code = ("from kvstore.kv import KVLayout, chunk_keys; "
            "print(','.join(c.key for c in chunk_keys(list(range(1000, 1037)), model='m', "
            "layout=KVLayout(2, 2, 16, 'bf16', chunk_size=8))))")
    outputs = set()
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "LMCACHE_LOG_LEVEL": "ERROR"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.add(out.stdout.strip())
    here = ",".join(c.key for c in chunk_keys(list(range(1000, 1037)), model="m", layout=KVLayout(2, 2, 16, "bf16", chunk_size=8)))
    assert outputs == {here}


class FailAfterPuts(Layer):
    """Lets ``limit`` puts through to the real backend, then fails every one, as a dying link would."""

    def __init__(self, inner, config, limit: int) -> None:
        super().__init__(inner, config)
        self.limit = limit
        self.puts = 0
        self._lock = threading.Lock()

    def put(self, name, data, metadata, *, if_absent=False):
        with self._lock:
            self.puts += 1
            allowed = self.puts <= self.limit
        if not allowed:
            raise StoreUnavailable("injected: link down", retryable=False)
        return self.inner.put(name, data, metadata, if_absent=if_absent)


def test_interrupted_dump_resumes_without_rewriting(tmp_path):
    layout = KVLayout(2, 2, 16, "float16", chunk_size=8)
    tokens, kv = _tokens(80), _kv(layout, 80)  # 10 chunks
    with kvstore.open(str(tmp_path / "store")) as real:
        failing = kvstore.KVStore(real.config, FailAfterPuts(real.backend, real.config, limit=4))
        with pytest.raises(StoreUnavailable):
            dump(failing, tokens, kv, model=MODEL, layout=layout, batch_chunks=2)
        first = {i.key: i.last_modified for i in real.scan()}
        assert len(first) == 4
        report = dump(real, tokens, kv, model=MODEL, layout=layout)
        assert (report.written, report.skipped) == (6, 4)
        after = {i.key: i.last_modified for i in real.scan()}
        assert len(after) == 10 and all(after[k] == t for k, t in first.items())
        assert torch.equal(load(real, tokens, model=MODEL, layout=layout), kv)
        assert dump(real, tokens, kv, model=MODEL, layout=layout).written == 0


def test_load_gives_the_longest_prefix_and_verify_names_problems(tmp_path):
    layout = KVLayout(2, 2, 16, "float16", chunk_size=8)
    tokens, kv = _tokens(), _kv(layout)
    (tmp_path / "store").mkdir()
    with kvstore.open(str(tmp_path / "store")) as s:
        assert load(s, tokens, model=MODEL, layout=layout) is None
        dump(s, tokens, kv, model=MODEL, layout=layout)
        names = [c.name for c in chunk_keys(tokens, model=MODEL, layout=layout)]
        s.delete(names[2])
        assert torch.equal(load(s, tokens, model=MODEL, layout=layout), kv[:, :, :16])
        s.put(names[3], b"short")
        raw = bytearray(s.get(names[1]))
        raw[0] ^= 0xFF
        meta = dict(s.stat(names[1]).metadata)
        s.backend.unwrap().put(s.name_of(names[1]), memoryview(raw), meta)  # bytes changed under the stored CRC
        report = verify(s, tokens, model=MODEL, layout=layout)
        assert [c.status for c in report.chunks] == ["ok", "corrupt", "missing", "wrong-size", "ok"]
        assert report.cached_tokens == 8 and not report.ok
        with pytest.raises(IntegrityError):
            load(s, tokens, model=MODEL, layout=layout)


def test_scan_reads_chain_metadata_and_gc_expires_tails_first(tmp_path):
    layout = KVLayout(2, 2, 16, "float16", chunk_size=8)
    root = tmp_path / "store"
    with kvstore.open(str(root)) as s:
        dump(s, _tokens(16, seed=1), _kv(layout, 16), model=MODEL, layout=layout)
        s.put("not-a-chunk", b"x")
        head, tail = sorted(scan(s, with_metadata=True), key=lambda c: c.index)
        assert (head.index, head.prev, tail.index, tail.prev) == (0, None, 1, head.chunk_hash)
        assert {head.tokens, tail.tokens} == {8} and head.model == "org_tiny-model" and head.status == "ok"
        os.utime(str(root / (s.name_of(head.key) + "#")), (1, 1))  # the head is old, its tail is not
        now = tail.last_modified + 10
        assert gc(s, older_than=3600, now=now).removed == []  # the tail still needs it
        report = gc(s, max_bytes=layout.chunk_bytes(8), dry_run=False, now=now)
        assert [c.key for c in report.removed] == [tail.key] and report.kept == 1 and report.reasons == {tail.key: "size"}
        assert s.exists(head.key) and s.exists("not-a-chunk")
        assert [c.key for c in gc(s, older_than=3600, now=now, dry_run=False).removed] == [head.key]


_KILLED_DUMP = """
import sys, torch, kvstore
from kvstore.kv import KVLayout, dump
url, endpoint, ak, sk = sys.argv[1:5]
layout = KVLayout(2, 2, 16, "float16", chunk_size=8)
tokens = torch.randint(0, 32000, (160,), generator=torch.Generator().manual_seed(0)).tolist()
kv = torch.randn(layout.chunk_shape(160), generator=torch.Generator().manual_seed(1)).to(layout.torch_dtype)
extra = {"s3_endpoint_url": endpoint, "aws_access_key_id": ak, "aws_secret_access_key": sk, "s3_region": "us-east-1",
         "kvstore_max_inflight": "1", "kvstore_timeout_s": "60"}
with kvstore.open(url, extra) as store:
    dump(store, tokens, kv, model="org/tiny-model", layout=layout, batch_chunks=1)
"""


@pytest.mark.servers
def test_dump_killed_midway_resumes_without_rewriting(s3_servers, unique_name):
    """SIGKILL a dump mid-way (slowed by a delaying proxy in front of moto); the rerun writes only the rest."""
    from kvstore.testing.faults import FaultProxy

    server = s3_servers.get("moto")
    bucket = unique_name("killed")
    server.create_bucket(bucket)
    url = server.url(bucket, "dumps")
    layout = KVLayout(2, 2, 16, "float16", chunk_size=8)
    tokens, kv = _tokens(160), _kv(layout, 160)  # 20 chunks, the same the child computes
    with FaultProxy(server.port) as proxy, kvstore.open(url, server.extra_config()) as store:
        proxy.delay(0.15)
        child = subprocess.Popen([sys.executable, "-c", _KILLED_DUMP, url, proxy.endpoint, server.access_key,
                                  server.secret_key], env={**os.environ, "PYTHONHASHSEED": "0"})
        try:
            deadline = 60
            while len(list(store.list())) < 5 and deadline > 0 and child.poll() is None:
                threading.Event().wait(0.1)
                deadline -= 0.1
        finally:
            child.kill()
            child.wait()
        before = len(list(store.list()))
        assert 5 <= before < 20, f"{before} chunks written before the kill"
    with kvstore.open(url, server.extra_config()) as rerun:
        report = dump(rerun, tokens, kv, model=MODEL, layout=layout)
        assert (report.skipped, report.written) == (before, 20 - before)
        assert rerun.metrics()["operations"]["put"]["calls"] == 20 - before  # nothing written twice
        assert torch.equal(load(rerun, tokens, model=MODEL, layout=layout), kv)
