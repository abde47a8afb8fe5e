"""Through LMCache's own objects: a read that timed out never writes the memory it was given.

The connector reads into a memory object of LMCache's LocalCPUBackend and hands it back to the
allocator when the read is cancelled. The allocator gives that memory to the next caller, so a
transfer that went on would overwrite someone else's KV cache. Each test holds the GET's answer
mid-body at the proxy, lets the caller give up, takes the memory back from the allocator, fills
it with a pattern, releases the answer and checks the pattern is intact.
"""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("lmcache.v1.storage_backend.connector", reason="lmcache is not importable")
torch = pytest.importorskip("torch")

from lmcache.v1.memory_management import MemoryFormat  # noqa: E402
from test_lmcache_connector import CHUNK, HIDDEN, key, make_manager, storage_plugin_config  # noqa: E402
from test_lmcache_faults import bucket, connector_for, full_chunk, loop, moto, run  # noqa: E402,F401

from kvstore.testing.faults import FaultProxy  # noqa: E402

pytestmark = [pytest.mark.servers, pytest.mark.lmcache, pytest.mark.timeout(120)]
BACKENDS = ["crt", "obstore", "fsspec"]
SETTLE_S = 2.0


def _reused(backend):
    """The next chunk-sized memory object from the allocator, filled with a pattern."""
    obj = backend.allocate([torch.Size([2, 1, CHUNK, HIDDEN])], [torch.bfloat16], MemoryFormat.KV_2LTD)
    assert obj is not None
    obj.tensor.fill_(7.0)
    return obj


def _released_and_settled(proxy: FaultProxy) -> None:
    proxy.release()
    time.sleep(SETTLE_S)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_timed_out_connector_get_never_writes_the_freed_memory(loop, moto, bucket, backend_name):  # noqa: F811
    with FaultProxy(moto.port) as proxy:
        extra = moto.extra_config(s3_endpoint_url=proxy.endpoint, kvstore_backend=backend_name, kvstore_timeout_s=20,
                                  kvstore_breaker_threshold=0)
        conn, backend = connector_for(loop, f"s3://127.0.0.1:{proxy.port}/{bucket}/kv", extra)
        inner = conn.getWrappedConnector()
        stored = full_chunk(backend, 11)
        run(loop, inner.put(key(11), stored))
        stored.ref_count_down()
        try:
            proxy.hold(after_bytes=4096, method="GET")

            async def give_up():
                return await asyncio.wait_for(inner.get(key(11)), 0.8)

            with pytest.raises((asyncio.TimeoutError, TimeoutError)):
                run(loop, give_up())
            assert proxy.holding.is_set(), "the GET never reached the proxy: the test proves nothing"
            reused = _reused(backend)
            _released_and_settled(proxy)
            assert bool((reused.tensor == 7.0).all()), "the cancelled read wrote memory the allocator had handed on"
            reused.ref_count_down()
        finally:
            proxy.release()
            run(loop, conn.close())


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_storage_plugin_get_blocking_timeout_stops_the_read(moto, bucket, backend_name):  # noqa: F811
    with FaultProxy(moto.port) as proxy:
        extra = moto.extra_config(s3_endpoint_url=proxy.endpoint, kvstore_backend=backend_name, kvstore_timeout_s=20,
                                  kvstore_breaker_threshold=0)
        config = storage_plugin_config(f"s3://127.0.0.1:{proxy.port}/{bucket}/kv", extra)
        config["blocking_timeout_secs"] = 1
        manager = make_manager(config)
        try:
            plugin = manager.storage_backends["kvstore"]
            cpu = plugin.local_cpu_backend
            stored = full_chunk(cpu, 12)
            run(plugin.loop, plugin.connector.put(key(12), stored))
            stored.ref_count_down()
            proxy.hold(after_bytes=4096, method="GET")
            started = time.monotonic()
            assert plugin.get_blocking(key(12)) is None
            assert time.monotonic() - started < 1 + 5.0
            assert proxy.holding.is_set(), "the GET never reached the proxy: the test proves nothing"
            reused = _reused(cpu)
            _released_and_settled(proxy)
            assert bool((reused.tensor == 7.0).all()), "the timed-out read wrote memory the allocator had handed on"
            reused.ref_count_down()
        finally:
            proxy.release()
            manager.close()
