"""``kv gc`` keeps every prompt's stored chunks a prefix of its chain, and cleans up temp files."""

from __future__ import annotations

import json
import os
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lmcache")

import kvstore  # noqa: E402
from kvstore.cli.main import main  # noqa: E402
from kvstore.kv import KVLayout, chunk_keys, dump, gc, scan, verify  # noqa: E402
from kvstore.kv.gc import plan  # noqa: E402
from kvstore.kv.inventory import ChunkInfo  # noqa: E402

pytestmark = pytest.mark.lmcache

MODEL = "org/gc-model"
LAYOUT = KVLayout(2, 2, 16, "bfloat16", chunk_size=8)


def _prompt(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 32000, (n,), generator=g).tolist(), torch.randn(LAYOUT.chunk_shape(n), generator=g).to(torch.bfloat16)


def _engine(url: str, name: str):
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig

    from kvstore.kv.keys import lmcache_metadata

    config = LMCacheEngineConfig.from_dict({
        "chunk_size": 8, "save_unfull_chunk": True, "local_cpu": True, "max_local_cpu_size": 0.05,
        "remote_storage_plugins": ["kvstore"],
        "extra_config": {"remote_storage_plugin.kvstore.module_path": "kvstore.lmcache",
                         "remote_storage_plugin.kvstore.class_name": "KVStoreConnectorAdapter", "kvstore_url": url},
    })
    engine = LMCacheEngineBuilder.get_or_create(name, config, lmcache_metadata(LAYOUT, model=MODEL), None, None, None)
    engine.post_init()
    return engine


def test_gc_halving_the_bytes_keeps_a_hit_prefix_of_every_prompt(tmp_path):
    """The old gc removed the oldest chunks, the heads of every chain: both prompts fell to 0 hits."""
    from lmcache.v1.cache_engine import LMCacheEngineBuilder

    url = str(tmp_path / "store")
    prompts = [_prompt(48, 1), _prompt(40, 2)]  # 6 and 5 chunks
    with kvstore.open(url) as store:
        for i, (tokens, kv) in enumerate(prompts):
            dump(store, tokens, kv, model=MODEL, layout=LAYOUT)
            for c in chunk_keys(tokens, model=MODEL, layout=LAYOUT):  # written head first, as LMCache does
                stamp = 1000 + 100 * i + c.index
                os.utime(os.path.join(url, store.name_of(c.name) + "#"), (stamp, stamp))
        total = sum(c.size for c in scan(store))
        report = gc(store, max_bytes=total // 2, dry_run=False)
        assert report.removed_bytes >= total - total // 2 and all(r == "size" for r in report.reasons.values())
        for tokens, _ in prompts:
            statuses = [c.status for c in verify(store, tokens, model=MODEL, layout=LAYOUT).chunks]
            kept = statuses.index("missing") if "missing" in statuses else len(statuses)
            assert kept > 0 and statuses == ["ok"] * kept + ["missing"] * (len(statuses) - kept), statuses
    engine = _engine(url, "gc-halved")
    try:
        for tokens, _ in prompts:
            assert engine.lookup(tokens=tokens) > 0
    finally:
        LMCacheEngineBuilder.destroy("gc-halved")


def test_chunks_behind_a_hole_go_first_and_damaged_ones_count_as_holes(tmp_path):
    url = str(tmp_path / "store")
    (tokens_a, kv_a), (tokens_b, kv_b) = _prompt(40, 3), _prompt(24, 4)
    with kvstore.open(url) as store:
        dump(store, tokens_a, kv_a, model=MODEL, layout=LAYOUT)
        dump(store, tokens_b, kv_b, model=MODEL, layout=LAYOUT)
        a = chunk_keys(tokens_a, model=MODEL, layout=LAYOUT)
        b = chunk_keys(tokens_b, model=MODEL, layout=LAYOUT)
        store.delete(a[2].name)
        path = os.path.join(url, store.name_of(b[1].name) + "#")
        with open(path, "r+b") as f:  # cut short: the store reports it damaged
            f.truncate(os.path.getsize(path) - 100)
        report = gc(store, dry_run=False)
        assert report.reasons == {a[3].name: "orphan", a[4].name: "orphan", b[1].name: "damaged", b[2].name: "orphan"}
        assert sorted(c.name for c in (a[0], a[1], b[0])) == sorted(c.key for c in scan(store))


def _info(key: str, index=None, prev=None, size=10, modified=0.0, status="ok") -> ChunkInfo:
    return ChunkInfo(f"m@1@0@{key}@half", "m", 1, 0, key, "half", size, 8, modified, status, "", index, prev)


def test_unchained_chunks_go_after_every_chained_tail_and_expiry_spares_parents():
    chunks = [_info("a0", 0, None, modified=1), _info("a1", 1, "a0", modified=2), _info("a2", 2, "a1", modified=3),
              _info("b0", 0, None, modified=1), _info("b1", 1, "b0", modified=9),
              _info("f00", modified=5), _info("f01", modified=6)]  # written by another tool: position unknown
    assert list(plan(chunks, max_bytes=40)) == ["m@1@0@a2@half", "m@1@0@a1@half", "m@1@0@b1@half"]
    order = list(plan(chunks, max_bytes=0))
    assert order.index("m@1@0@f01@half") > order.index("m@1@0@b0@half") and order[-2:] == ["m@1@0@f01@half", "m@1@0@f00@half"]
    # a1 and a0 are old but a2 is not; b1 is young, so b0 stays too
    assert plan(chunks, older_than=5, now=8) == {}
    assert set(plan(chunks, older_than=2.5, now=8)) == {"m@1@0@a0@half", "m@1@0@a1@half", "m@1@0@a2@half", "m@1@0@f00@half"}
    assert set(plan(chunks, older_than=4, now=12)) == {"m@1@0@a0@half", "m@1@0@a1@half", "m@1@0@a2@half",
                                                        "m@1@0@f00@half", "m@1@0@f01@half"}


def test_the_lmcache_adapter_records_each_chunks_predecessor(tmp_path):
    """Chunks LMCache stores through the kvstore plugin carry lmcache-prev, so gc sees their chains."""
    from lmcache.v1.cache_engine import LMCacheEngineBuilder

    url = str(tmp_path / "store")
    (tmp_path / "store").mkdir()  # so that listing while LMCache's puts are in flight finds the root
    tokens, kv = _prompt(40, 5)
    engine = _engine(url, "gc-adapter")
    try:
        assert engine.lookup(tokens=tokens) == 0
        manager = engine.storage_manager
        keys, objs = [], []
        for start, end, key in engine.token_database.process_tokens(tokens=tokens):
            obj = manager.allocate(torch.Size(LAYOUT.chunk_shape(end - start)), LAYOUT.torch_dtype)
            obj.tensor.copy_(kv[:, :, start:end])
            keys.append(key)
            objs.append(obj)
        manager.batched_put(keys[2:], objs[2:], location="RemoteBackend-kvstore")  # the head was hit elsewhere
        for obj in objs[:2]:
            obj.ref_count_down()
        with kvstore.open(url) as store:
            deadline = time.monotonic() + 10
            while len(list(store.list())) < 3:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            infos = {c.chunk_hash: c for c in scan(store, with_metadata=True)}
    finally:
        LMCacheEngineBuilder.destroy("gc-adapter")
    expected = chunk_keys(tokens, model=MODEL, layout=LAYOUT)
    for c in expected[2:]:
        assert infos[c.key.split("@")[3]].prev == c.prev_hash  # the first one's from the lookup


def test_gc_removes_stale_temp_files_and_stat_reports_them(tmp_path, capsys):
    url = str(tmp_path / "store")
    tokens, kv = _prompt(16, 6)
    with kvstore.open(url) as store:
        dump(store, tokens, kv, model=MODEL, layout=LAYOUT)
        if not hasattr(store.backend.unwrap(), "stale_temp_files"):
            pytest.skip("FileBackend.stale_temp_files is not there yet")
        name = store.name_of(chunk_keys(tokens, model=MODEL, layout=LAYOUT)[0].name)
    old, new = os.path.join(url, name + "#tmp.dead1"), os.path.join(url, name + "#tmp.live2")
    for path in (old, new):
        with open(path, "wb") as f:
            f.write(b"x" * 1000)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert main(["kv", "stat", url, "--json"]) == 0
    temp = json.loads(capsys.readouterr().out)["temp_files"]
    assert (temp["files"], temp["stale_files"], temp["stale_bytes"]) == (2, 1, 1000)
    assert main(["kv", "gc", "--json", url]) == 0
    assert json.loads(capsys.readouterr().out)["temp_files"] == 1 and os.path.exists(old)  # a dry run
    assert main(["kv", "gc", url, "--delete", "--tmp-older-than", "1h", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["temp_bytes"] == 1000
    assert not os.path.exists(old) and os.path.exists(new)
