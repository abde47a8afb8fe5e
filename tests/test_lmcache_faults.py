"""The connector against misbehaving S3 (a real fault proxy in front of moto) and LMCache's own S3Connector."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

pytest.importorskip("lmcache.v1.storage_backend.connector", reason="lmcache is not importable")
torch = pytest.importorskip("torch")

from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.memory_management import MemoryFormat  # noqa: E402
from lmcache.v1.storage_backend.connector import CreateConnector  # noqa: E402
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: E402
from test_lmcache_connector import CHUNK, HIDDEN, key, lmcache_metadata  # noqa: E402

from kvstore.testing.faults import FaultProxy  # noqa: E402
from kvstore.testing.servers import virtual_hosting_works  # noqa: E402

pytestmark = [pytest.mark.servers, pytest.mark.lmcache]

PLUGIN_KEYS = {"remote_storage_plugin.kvstore.module_path": "kvstore.lmcache",
               "remote_storage_plugin.kvstore.class_name": "KVStoreConnectorAdapter"}


@pytest.fixture(scope="module")
def moto(s3_servers):
    return s3_servers.get("moto")


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.fixture
def bucket(moto):
    name = f"lmf-{os.urandom(4).hex()}"
    moto.create_bucket(name)
    yield name
    moto.delete_bucket(name)


def connector_for(loop, url: str | None, extra: dict, plugins=("kvstore",)):
    """A connector built by LMCache's CreateConnector, with a real LocalCPUBackend."""
    config_dict = {"chunk_size": CHUNK, "local_cpu": True, "max_local_cpu_size": 0.2, "extra_config": extra}
    if plugins:
        config_dict["remote_storage_plugins"] = list(plugins)
        extra.update(PLUGIN_KEYS)
        extra["kvstore_url"] = url
    config = LMCacheEngineConfig.from_dict(config_dict)
    backend = LocalCPUBackend(config, lmcache_metadata())
    target = "plugin://kvstore" if plugins else url
    return CreateConnector(target, loop, backend, config, lmcache_metadata()), backend


def full_chunk(backend, seed: int):
    obj = backend.allocate([torch.Size([2, 1, CHUNK, HIDDEN])], [torch.bfloat16], MemoryFormat.KV_2LTD)
    obj.tensor.copy_(torch.randn(obj.tensor.shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16))
    return obj


def run(loop, coro, timeout=30):
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


def test_http_500_fails_put_visibly(loop, moto, bucket):
    # The proxy stands for an S3 endpoint whose every answer is "500 InternalError".
    with FaultProxy(moto.port) as proxy:
        proxy.error(500)
        extra = moto.extra_config(s3_endpoint_url=proxy.endpoint, kvstore_max_retries=0)
        conn, backend = connector_for(loop, f"s3://127.0.0.1:{proxy.port}/{bucket}/kv", extra)
        inner = conn.getWrappedConnector()
        obj = full_chunk(backend, 1)
        with pytest.raises(Exception) as info:
            run(loop, inner.put(key(1), obj))
        assert "500" in str(info.value) or "nternal" in str(info.value)
        obj.ref_count_down()
        run(loop, conn.close())


def test_connector_recovers_after_outage_without_restart(loop, moto, bucket):
    # The proxy stands for the network path to S3: refusing connections is the outage.
    with FaultProxy(moto.port) as proxy:
        extra = moto.extra_config(s3_endpoint_url=proxy.endpoint, kvstore_max_retries=0,
                                  kvstore_breaker_threshold=2, kvstore_breaker_reset_s=0.2, kvstore_timeout_s=3)
        conn, backend = connector_for(loop, f"s3://127.0.0.1:{proxy.port}/{bucket}/kv", extra)
        inner = conn.getWrappedConnector()
        obj = full_chunk(backend, 2)
        proxy.refuse()
        for _ in range(3):
            with pytest.raises(Exception):  # noqa: B017 - LMCache's connector raises its own types
                run(loop, inner.put(key(2), obj))
        assert run(loop, inner.ping()) == 1
        proxy.clear()
        deadline = time.monotonic() + 10
        while True:
            try:
                run(loop, inner.put(key(2), obj))
                break
            except Exception:
                assert time.monotonic() < deadline, "still failing after the outage ended"
                time.sleep(0.1)
        got = run(loop, inner.get(key(2)))
        assert got is not None and torch.equal(got.tensor, obj.tensor)
        got.ref_count_down()
        obj.ref_count_down()
        run(loop, conn.close())


def test_close_returns_with_64_requests_in_flight(loop, moto, bucket):
    with FaultProxy(moto.port) as proxy:
        proxy.delay(5.0)
        extra = moto.extra_config(s3_endpoint_url=proxy.endpoint, kvstore_max_inflight=16)
        conn, backend = connector_for(loop, f"s3://127.0.0.1:{proxy.port}/{bucket}/kv", extra)
        inner = conn.getWrappedConnector()
        futures = [asyncio.run_coroutine_threadsafe(inner.exists(key(i)), loop) for i in range(64)]
        time.sleep(0.3)
        started = time.monotonic()
        run(loop, conn.close(), timeout=5)
        assert time.monotonic() - started < 2.0
        for f in futures:
            f.cancel()


@pytest.mark.skipif(not virtual_hosting_works(), reason="bucket.localhost does not resolve to 127.0.0.1, and LMCache's "
                    "S3Connector only speaks virtual-hosted style")
def test_interop_with_lmcache_s3_connector(loop, moto, bucket):
    lm_extra = {"s3_region": moto.region, "disable_tls": True, "s3_prefer_http2": False, "save_chunk_meta": False,
                "aws_access_key_id": moto.access_key, "aws_secret_access_key": moto.secret_key}
    theirs, their_backend = connector_for(loop, f"s3://{bucket}.localhost:{moto.port}", lm_extra, plugins=())
    ours, our_backend = connector_for(loop, moto.url(bucket), moto.extra_config())
    written_by_them = full_chunk(their_backend, 3)
    run(loop, theirs.getWrappedConnector().put(key(0x31), written_by_them))
    got = run(loop, ours.getWrappedConnector().get(key(0x31)))
    assert got is not None and torch.equal(got.tensor, written_by_them.tensor)
    got.ref_count_down()

    written_by_us = full_chunk(our_backend, 4)
    run(loop, ours.getWrappedConnector().put(key(0x32), written_by_us))
    back = run(loop, theirs.getWrappedConnector().get(key(0x32)))
    assert back is not None and torch.equal(back.tensor, written_by_us.tensor)
    back.ref_count_down()
    run(loop, ours.close())
