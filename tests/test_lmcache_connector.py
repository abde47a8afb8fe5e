"""The LMCache remote-storage plugin and storage plugin, driven through LMCache's own StorageManager."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

lmcache = pytest.importorskip("lmcache.v1.storage_backend.storage_manager", reason="lmcache is not importable")
torch = pytest.importorskip("torch")

from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.event_manager import EventManager  # noqa: E402
from lmcache.v1.memory_management import MemoryFormat  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.storage_manager import StorageManager  # noqa: E402

import kvstore  # noqa: E402
from kvstore import naming  # noqa: E402

pytestmark = pytest.mark.lmcache

CHUNK = 16
HIDDEN = 8 * 128
MODEL = "org/m"


def lmcache_metadata() -> LMCacheMetadata:
    return LMCacheMetadata(model_name=MODEL, world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                           kv_dtype=torch.bfloat16, kv_shape=(1, 2, CHUNK, 8, 128), chunk_size=CHUNK)


def remote_plugin_config(url: str, extra: dict) -> dict:
    return {"chunk_size": CHUNK, "local_cpu": True, "max_local_cpu_size": 0.2, "remote_storage_plugins": ["kvstore"],
            "extra_config": {"remote_storage_plugin.kvstore.module_path": "kvstore.lmcache",
                             "remote_storage_plugin.kvstore.class_name": "KVStoreConnectorAdapter",
                             "kvstore_url": url, **extra}}


def storage_plugin_config(url: str, extra: dict) -> dict:
    return {"chunk_size": CHUNK, "local_cpu": True, "max_local_cpu_size": 0.2, "storage_plugins": ["kvstore"],
            "extra_config": {"storage_plugin.kvstore.module_path": "kvstore.lmcache",
                             "storage_plugin.kvstore.class_name": "KVStoreStoragePlugin",
                             "kvstore_url": url, **extra}}


def make_manager(config: dict) -> StorageManager:
    return StorageManager(config=LMCacheEngineConfig.from_dict(config), metadata=lmcache_metadata(), event_manager=EventManager())


def chunk(manager: StorageManager, tokens: int, seed: int):
    obj = manager.allocate([torch.Size([2, 1, tokens, HIDDEN])], [torch.bfloat16], MemoryFormat.KV_2LTD)
    gen = torch.Generator().manual_seed(seed)
    obj.tensor.copy_(torch.randn(obj.tensor.shape, generator=gen).to(torch.bfloat16))
    return obj


def key(chunk_hash: int, model: str = MODEL) -> CacheEngineKey:
    return CacheEngineKey(model, 1, 0, chunk_hash, torch.bfloat16)


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture(scope="module", params=["file", *(pytest.param(s, marks=pytest.mark.servers) for s in ("moto", "seaweedfs", "ceph"))])
def store_target(request, tmp_path_factory):
    """(url, extra_config) of an empty store: a directory, or a fresh bucket on one of the S3 servers."""
    if request.param == "file":
        yield f"file://{tmp_path_factory.mktemp('lmc')}", {}
        return
    server = request.getfixturevalue("s3_servers").get(request.param)
    bucket = f"lmc-{os.urandom(4).hex()}"
    server.create_bucket(bucket)
    yield server.url(bucket, "kv"), server.extra_config()
    server.delete_bucket(bucket)


@pytest.fixture(scope="module")
def stored(store_target):
    """A StorageManager with the remote plugin that stored one full and one short chunk."""
    url, extra = store_target
    manager = make_manager(remote_plugin_config(url, extra))
    keys, tensors = [key(0x1234), key(-0x22B)], []
    objs = [chunk(manager, CHUNK, 1), chunk(manager, 5, 2)]
    tensors = [o.tensor.clone() for o in objs]
    manager.batched_put(keys, objs)
    backend = manager.storage_backends["RemoteBackend-kvstore"]
    wait_for(lambda: backend.batched_contains(keys) == 2)
    yield manager, backend, keys, tensors
    manager.close()


def test_round_trip_bit_exact_with_short_last_chunk(stored, store_target):
    manager, backend, keys, tensors = stored
    for k, expected in zip(keys, tensors):
        got = backend.get_blocking(k)
        assert got is not None
        assert got.get_shapes()[0] == expected.shape
        assert torch.equal(got.tensor, expected)
        got.ref_count_down()
    with kvstore.open(*store_target) as store:
        info = store.stat(naming.chunk_name(keys[1].to_string()))
    assert info.size == 2 * 5 * HIDDEN * 2
    assert info.metadata["lmcache-tokens"] == "5"


def test_names_match_lmcache_s3_connector(stored, store_target):
    _, _, keys, _ = stored
    with kvstore.open(*store_target) as store:
        names = set(store.list())
    assert {"org_m@1@0@1234@bfloat16", "org_m@1@0@-22b@bfloat16"} <= names


def test_batched_lookup_counts_hit_prefix(stored):
    _, backend, keys, _ = stored
    missing = key(0x777)
    lookup = asyncio.run_coroutine_threadsafe(backend.batched_async_contains("l1", [keys[0], missing, keys[1]]), backend.loop)
    assert lookup.result(10) == 1
    got = asyncio.run_coroutine_threadsafe(backend.batched_get_non_blocking("l1", [keys[0], keys[1], missing]), backend.loop).result(10)
    assert len(got) == 2
    for obj in got:
        obj.ref_count_down()


def test_connector_list_ping_remove(stored):
    _, backend, keys, _ = stored
    conn = backend.connection
    assert asyncio.run_coroutine_threadsafe(conn.ping(), backend.loop).result(10) == 0
    listed = asyncio.run_coroutine_threadsafe(conn.list(), backend.loop).result(10)
    assert keys[0].to_string().replace("/", "_") in listed
    assert conn.remove_sync(key(0x99)) is False


SUBPROCESS_LOAD = r"""
import json, sys, hashlib, torch
sys.path.insert(0, {tests!r})
from test_lmcache_connector import make_manager, remote_plugin_config, key
url, extra, hashes = json.loads(sys.argv[1])
manager = make_manager(remote_plugin_config(url, extra))
backend = manager.storage_backends["RemoteBackend-kvstore"]
out = []
for h in hashes:
    got = backend.get_blocking(key(h))
    out.append(None if got is None else [list(got.tensor.shape), hashlib.sha256(got.tensor.view(torch.uint8).numpy().tobytes()).hexdigest()])
    if got is not None:
        got.ref_count_down()
manager.close()
print("RESULT" + json.dumps(out))
"""


def test_fresh_process_finds_and_loads_chunks(stored, store_target):
    import hashlib

    _, _, keys, tensors = stored
    url, extra = store_target
    script = SUBPROCESS_LOAD.format(tests=os.path.dirname(__file__))
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps([url, extra, [0x1234, -0x22B]])],
                          capture_output=True, text=True, timeout=120, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, proc.stderr[-2000:]
    result = json.loads(line[0][len("RESULT"):])
    for (shape, digest), expected in zip(result, tensors):
        assert shape == list(expected.shape)
        assert digest == hashlib.sha256(expected.view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def plugin_manager(tmp_path_factory):
    url = f"file://{tmp_path_factory.mktemp('plugin')}"
    manager = make_manager(storage_plugin_config(url, {}))
    yield manager, manager.storage_backends["kvstore"], url
    manager.close()


def test_storage_plugin_round_trip_pins_and_long_keys(plugin_manager):
    manager, plugin, url = plugin_manager
    long_key = key(0xABC, model="org/" + "m" * 1500)
    keys = [key(0x51), long_key]
    objs = [chunk(manager, CHUNK, 5), chunk(manager, 3, 6)]
    tensors = [o.tensor.clone() for o in objs]
    manager.batched_put(keys, objs)
    wait_for(lambda: plugin.batched_contains(keys) == 2 and not any(plugin.exists_in_put_tasks(k) for k in keys))
    for k, expected in zip(keys, tensors):
        got = plugin.get_blocking(k)
        assert got is not None and torch.equal(got.tensor, expected)
        got.ref_count_down()

    assert plugin.pin(keys[0]) is True
    assert plugin.pin(key(0xDEAD)) is False  # nothing stored to pin
    assert plugin.remove(keys[0], force=False) is False
    assert plugin.contains(keys[0])
    assert plugin.unpin(keys[0]) is True
    assert plugin.unpin(keys[0]) is False
    assert plugin.remove(keys[0], force=False) is True
    assert not plugin.contains(keys[0])


def test_storage_plugin_fresh_instance_sees_earlier_chunks(plugin_manager):
    manager, plugin, url = plugin_manager
    k = key(0x61)
    obj = chunk(manager, 7, 7)
    expected = obj.tensor.clone()
    manager.batched_put([k], [obj])
    wait_for(lambda: plugin.contains(k) and not plugin.exists_in_put_tasks(k))
    other = make_manager(storage_plugin_config(url, {}))
    try:
        fresh = other.storage_backends["kvstore"]
        assert fresh.contains(k)
        got = fresh.get_blocking(k)
        assert got is not None and got.get_shapes()[0][2] == 7 and torch.equal(got.tensor, expected)
        got.ref_count_down()
    finally:
        other.close()


@pytest.mark.servers
def test_a_chunk_retrieved_costs_one_get_and_no_head(s3_servers):
    """Against moto behind a counting proxy: a full and a short chunk each come back with one
    request (the GET hands back size and layout), where a HEAD came before every GET."""
    from kvstore.testing.faults import FaultProxy

    moto = s3_servers.get("moto")
    bucket = f"lmc-{os.urandom(4).hex()}"
    moto.create_bucket(bucket)
    with FaultProxy(moto.port) as proxy:
        manager = make_manager(remote_plugin_config(moto.url(bucket, "kv"), moto.extra_config(s3_endpoint_url=proxy.endpoint)))
        try:
            backend = manager.storage_backends["RemoteBackend-kvstore"]
            keys = [key(0x4321), key(0x4322)]
            objs = [chunk(manager, CHUNK, 3), chunk(manager, 5, 4)]
            tensors = [o.tensor.clone() for o in objs]
            manager.batched_put(keys, objs)
            wait_for(lambda: backend.batched_contains(keys) == 2)
            for k, expected in zip(keys, tensors):
                before = proxy.responses
                got = backend.get_blocking(k)
                requests = proxy.responses - before
                assert got is not None and torch.equal(got.tensor, expected)
                assert got.get_shapes()[0] == expected.shape
                got.ref_count_down()
                assert requests == 1, f"{requests} requests to retrieve one chunk"
            before = proxy.responses
            assert backend.get_blocking(key(0x999)) is None
            assert proxy.responses - before == 1  # a miss: the GET's 404
        finally:
            manager.close()
    moto.delete_bucket(bucket)
