"""The MP-mode L2 adapter, built by LMCache's own plugin loader and factory."""

from __future__ import annotations

import argparse
import json
import select

import pytest

pytest.importorskip("lmcache.v1.distributed.l2_adapters.plugin_l2_adapter", reason="lmcache is not importable")
torch = pytest.importorskip("torch")

from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.distributed.api import ObjectKey  # noqa: E402
from lmcache.v1.distributed.l2_adapters.config import get_l2_adapter_config_class  # noqa: E402
from lmcache.v1.distributed.l2_adapters.factory import create_l2_adapter_from_registry  # noqa: E402
from lmcache.v1.memory_management import MemoryFormat  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: E402

import kvstore  # noqa: E402
from kvstore import naming  # noqa: E402

pytestmark = pytest.mark.lmcache

SHAPE = torch.Size([2, 1, 16, 1024])


@pytest.fixture(scope="module")
def cpu_backend():
    config = LMCacheEngineConfig.from_legacy(chunk_size=16)
    metadata = LMCacheMetadata(model_name="org/m", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                               kv_dtype=torch.bfloat16, kv_shape=(1, 2, 16, 8, 128), chunk_size=16)
    return LocalCPUBackend(config, metadata)


def buffer(backend, seed: int | None = None):
    obj = backend.allocate([SHAPE], [torch.bfloat16], MemoryFormat.KV_2LTD)
    if seed is not None:
        obj.tensor.copy_(torch.randn(obj.tensor.shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16))
    else:
        obj.tensor.zero_()
    return obj


def wait_fd(fd: int) -> None:
    ready, _, _ = select.select([fd], [], [], 10)
    assert ready, "event fd not signalled"


def poll(query, task_id):
    for _ in range(500):
        result = query(task_id)
        if result is not None:
            return result
        select.select([], [], [], 0.01)
    raise AssertionError("task never completed")


def test_round_trip_through_lmcache_loader(tmp_path, cpu_backend):
    spec = {"type": "plugin", "module_path": "kvstore.lmcache.l2", "class_name": "KVStoreL2Adapter",
            "config_class_name": "KVStoreL2AdapterConfig",
            "adapter_params": {"kvstore_url": f"file://{tmp_path}", "max_capacity_gb": 1}}
    config = get_l2_adapter_config_class("plugin").from_dict(spec)
    adapter = create_l2_adapter_from_registry(config)
    try:
        fds = {adapter.get_store_event_fd(), adapter.get_lookup_and_lock_event_fd(), adapter.get_load_event_fd()}
        assert len(fds) == 3
        keys = [ObjectKey(chunk_hash=bytes([i]) * 8, model_name="org/m", kv_rank=3) for i in range(2)]
        objs = [buffer(cpu_backend, seed=i) for i in range(2)]
        task = adapter.submit_store_task(keys, objs)
        wait_fd(adapter.get_store_event_fd())
        result = adapter.pop_completed_store_tasks()[task]
        assert result.is_successful() and result.bytes_transferred() == 2 * objs[0].get_size()
        assert adapter.get_usage().total_bytes_used == 2 * objs[0].get_size()
        with kvstore.open(f"file://{tmp_path}") as store:
            assert store.exists("org/m@00000003@0@" + "00" * 8)  # the built-in S3 L2 adapter's name

        missing = ObjectKey(chunk_hash=b"\xff" * 8, model_name="org/m", kv_rank=3)
        lookup = adapter.submit_lookup_and_lock_task([keys[0], missing, keys[1]], {})
        bitmap = poll(adapter.query_lookup_and_lock_result, lookup)
        assert [bitmap.test(i) for i in range(3)] == [True, False, True]

        targets = [buffer(cpu_backend) for _ in keys]
        load = adapter.submit_load_task(keys, targets)
        loaded = poll(adapter.query_load_result, load)
        assert loaded.test(0) and loaded.test(1)
        assert all(torch.equal(t.tensor, o.tensor) for t, o in zip(targets, objs))

        adapter.delete([keys[0]])  # locked by the lookup: kept
        with kvstore.open(f"file://{tmp_path}") as store:
            assert store.exists(naming.mp_object_name(keys[0]))
        adapter.submit_unlock(keys)
        adapter.delete(keys)
        with kvstore.open(f"file://{tmp_path}") as store:
            assert not store.exists(naming.mp_object_name(keys[0]))
        assert adapter.get_usage().total_bytes_used == 0
    finally:
        adapter.close()


def test_adapter_params_accept_builtin_s3_keys():
    from kvstore.lmcache.l2 import KVStoreL2AdapterConfig

    config = KVStoreL2AdapterConfig.from_dict({
        "s3_endpoint": "s3://my-bucket.s3.us-west-2.amazonaws.com", "s3_region": "us-west-2", "s3_num_io_threads": 8,
        "s3_prefer_http2": True, "s3_enable_s3express": False, "disable_tls": False, "max_capacity_gb": 2,
    })
    assert config.store_config.bucket == "my-bucket"
    assert config.store_config.lmcache.capacity_bytes == 2 * 1024**3


@pytest.mark.parametrize("key, value", [("eviction", {"eviction_policy": "LRU"}), ("serde", {"type": "fp8"}),
                                        ("persist_enabled", False), ("type", "s3")])
def test_framework_key_inside_adapter_params_is_refused_with_where_it_belongs(tmp_path, key, value):
    """LMCache reads these only beside adapter_params: inside it they would silently do nothing."""
    from lmcache.v1.distributed.l2_adapters.config import add_l2_adapters_args, parse_args_to_l2_adapters_config

    spec = {"type": "plugin", "module_path": "kvstore.lmcache.l2", "class_name": "KVStoreL2Adapter",
            "config_class_name": "KVStoreL2AdapterConfig",
            "adapter_params": {"kvstore_url": f"file://{tmp_path}", "max_capacity_gb": 1, key: value}}
    parser = argparse.ArgumentParser()
    add_l2_adapters_args(parser)
    config = parse_args_to_l2_adapters_config(parser.parse_args(["--l2-adapter", json.dumps(spec)]))
    assert config.adapters[0].eviction_config is None  # what LMCache itself saw: no eviction
    with pytest.raises(ValueError, match=f"'{key}' inside adapter_params.*top level of the --l2-adapter spec"):
        create_l2_adapter_from_registry(config.adapters[0])


def test_eviction_at_the_top_level_reaches_lmcache_and_the_adapter_builds(tmp_path):
    from lmcache.v1.distributed.l2_adapters.config import add_l2_adapters_args, parse_args_to_l2_adapters_config

    spec = {"type": "plugin", "module_path": "kvstore.lmcache.l2", "class_name": "KVStoreL2Adapter",
            "config_class_name": "KVStoreL2AdapterConfig",
            "adapter_params": {"kvstore_url": f"file://{tmp_path}", "max_capacity_gb": 1},
            "eviction": {"eviction_policy": "LRU", "trigger_watermark": 0.7, "eviction_ratio": 0.3}}
    parser = argparse.ArgumentParser()
    add_l2_adapters_args(parser)
    config = parse_args_to_l2_adapters_config(parser.parse_args(["--l2-adapter", json.dumps(spec)]))
    assert (config.adapters[0].eviction_config.eviction_policy, config.adapters[0].eviction_config.trigger_watermark) == ("LRU", 0.7)
    adapter = create_l2_adapter_from_registry(config.adapters[0])
    try:
        assert adapter.supports_global_eviction  # max_capacity_gb reached it: the controller will evict
    finally:
        adapter.close()


@pytest.mark.servers
def test_lookups_answer_from_memory_list_pages_and_delete_without_heads(s3_servers, cpu_backend):
    """Against moto behind a counting proxy: a lookup of keys this adapter stored or already found
    sends nothing, an unknown key one HEAD; ``list_l2_keys`` pages with one ListObjectsV2 each,
    filters by model, skips foreign objects and resumes from its cursor; a delete sends one
    DeleteObjects and no HEAD."""
    import os

    from kvstore.testing.faults import FaultProxy

    moto = s3_servers.get("moto")
    bucket = f"l2-{os.urandom(4).hex()}"
    moto.create_bucket(bucket)
    params = {"kvstore_url": moto.url(bucket), "max_capacity_gb": 1}
    stored = [ObjectKey(chunk_hash=i.to_bytes(8, "big"), model_name="org/m", kv_rank=1) for i in range(1100)]
    with kvstore.open(moto.url(bucket), moto.extra_config()) as store:  # objects written by another node
        store.put_many((naming.mp_object_name(k), b"x" * 64) for k in stored)
        store.put(naming.mp_object_name(ObjectKey(chunk_hash=b"\x01" * 8, model_name="other", kv_rank=1)), b"y")
        store.put("not-a-chunk", b"z")
    with FaultProxy(moto.port) as proxy:
        adapter = create_l2_adapter_from_registry(get_l2_adapter_config_class("plugin").from_dict(
            {"type": "plugin", "module_path": "kvstore.lmcache.l2", "class_name": "KVStoreL2Adapter",
             "config_class_name": "KVStoreL2AdapterConfig",
             "adapter_params": {**params, **moto.extra_config(s3_endpoint_url=proxy.endpoint)}}))
        try:
            def requests_for(action):
                before = proxy.responses
                result = action()
                return result, proxy.responses - before

            def lookup(keys):
                bitmap = poll(adapter.query_lookup_and_lock_result, adapter.submit_lookup_and_lock_task(keys, {}))
                adapter.submit_unlock(keys)
                return [bitmap.test(i) for i in range(len(keys))]

            hits, sent = requests_for(lambda: lookup(stored[:3]))
            assert hits == [True] * 3 and sent == 3  # unknown to this adapter: one HEAD each
            hits, sent = requests_for(lambda: lookup(stored[:3]))
            assert hits == [True] * 3 and sent == 0  # found before: answered from memory

            mine = [ObjectKey(chunk_hash=b"\xaa" * 8, model_name="org/m", kv_rank=1)]
            task = adapter.submit_store_task(mine, [buffer(cpu_backend, seed=1)])
            wait_fd(adapter.get_store_event_fd())
            assert adapter.pop_completed_store_tasks()[task].is_successful()
            hits, sent = requests_for(lambda: lookup(mine))
            assert hits == [True] and sent == 0  # stored here

            pages, listed = [], []
            cursor = None
            while True:
                page, sent = requests_for(lambda c=cursor: adapter.list_l2_keys(model_name="org/m", page_size=500, cursor=c))
                pages.append((len(page.entries), sent))
                listed.extend(page.entries)
                cursor = page.next_page_token
                if cursor is None:
                    break
            assert [n for n, _ in pages][:2] == [500, 500] and sum(n for n, _ in pages) == 1101
            assert all(sent == 1 for _, sent in pages), pages
            assert {e.key.chunk_hash_hex for e in listed} == {k.chunk_hash.hex() for k in [*stored, *mine]}
            assert all(e.key.model_name == "org/m" for e in listed)
            everything = adapter.list_l2_keys(page_size=5000)
            assert len(everything.entries) == 1000 and everything.next_page_token is not None
            rest = adapter.list_l2_keys(page_size=5000, cursor=everything.next_page_token)
            assert len(rest.entries) == 102 and rest.next_page_token is None  # 'other' counted, 'not-a-chunk' not
            with pytest.raises(ValueError):
                adapter.list_l2_keys(cursor="garbage")

            _, sent = requests_for(lambda: adapter.delete(stored[:10]))
            assert sent == 1  # one DeleteObjects, no HEADs
            with kvstore.open(moto.url(bucket), moto.extra_config()) as store:
                assert not any(store.exists_many([naming.mp_object_name(k) for k in stored[:10]]))
                assert store.exists(naming.mp_object_name(stored[10]))
        finally:
            adapter.close()
    moto.delete_bucket(bucket)
