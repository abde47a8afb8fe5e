"""Load against moto: many threads of mixed operations, then a long run that must not leak memory or sockets.

KVSTORE_SOAK=1 makes the long run 100,000 operations instead of 3,000 (after 500 to warm up).
"""

from __future__ import annotations

import hashlib
import os
import random
import threading

import pytest

import kvstore
from kvstore.backends import backend_class

pytestmark = [pytest.mark.servers, pytest.mark.timeout(120)]
THREADS = 32
OPS_PER_THREAD = 40
LEAK_OPS = 100_000 if os.environ.get("KVSTORE_SOAK") == "1" else 10_000


@pytest.fixture(scope="module")
def s3_backend():
    for name in ("crt", "obstore", "fsspec"):
        try:
            backend_class(name)
            return name
        except (ImportError, ModuleNotFoundError):
            continue
    pytest.skip("no S3 backend available")


@pytest.fixture
def store(s3_servers, unique_name, s3_backend):
    server = s3_servers.get("moto")
    bucket = unique_name("load")
    server.create_bucket(bucket)
    with kvstore.open(f"s3://{bucket}/load", server.extra_config(
            kvstore_backend=s3_backend, kvstore_checksum="crc32c", kvstore_timeout_s=30)) as opened:
        yield opened


def payload(key: str, version: int) -> bytes:
    """Content derived from the key and a version, so any read can be checked without shared state."""
    seed = hashlib.sha256(f"{key}:{version}".encode()).digest()
    return f"{key}:{version}:".encode() + seed * (1 + len(key) % 64)


def check(key: str, data: bytes | None) -> None:
    if data is None:
        return
    _, version, _ = data.split(b":", 2)
    assert data == payload(key, int(version)), f"corrupt read of {key}"


def test_mixed_operations_from_many_threads(store):
    keys = [f"shared/{i}" for i in range(64)]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for op in range(OPS_PER_THREAD):
                key = rng.choice(keys)
                kind = rng.random()
                if kind < 0.35:
                    store.put(key, payload(key, seed * 1000 + op))
                elif kind < 0.65:
                    check(key, store.get(key))
                elif kind < 0.8:
                    buffer = bytearray(4096)
                    size = store.get_into(key, buffer)
                    check(key, None if size is None else bytes(buffer[:size]))
                elif kind < 0.9:
                    store.exists(key)
                else:
                    store.delete(key)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(100)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert errors == []
    ops = store.metrics()["operations"]
    assert sum(v["calls"] for v in ops.values()) >= THREADS * OPS_PER_THREAD
    assert not any(k.startswith("errors") for v in ops.values() for k in v)


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def null_store(s3_backend):
    from kvstore.bench.null_endpoint import NullEndpoint

    with NullEndpoint() as null, kvstore.open(null.url("leak", "load"), null.extra_config(
            kvstore_backend=s3_backend, kvstore_checksum="crc32c", kvstore_timeout_s=30)) as opened:
        yield opened


@pytest.mark.timeout(600 if os.environ.get("KVSTORE_SOAK") == "1" else 120)
def test_no_leaks_over_many_operations(null_store):
    from kvstore.bench.null_endpoint import payload as served  # what the null endpoint answers for a size

    def run(n: int) -> None:
        for i in range(0, n, 2):
            key, size = f"leak/{i % 50}", 4096 + (i % 7) * 512
            null_store.put(key, served(size))
            assert null_store.get(key) == served(size), f"read {key} back wrong"

    run(500)  # warm up: connection pools, caches, allocator arenas
    rss_before, fds_before = rss_kib(), open_fds()
    run(LEAK_OPS)
    rss_growth_mib = (rss_kib() - rss_before) / 1024
    calls = null_store.metrics()["operations"]
    assert calls["get"]["calls"] == (500 + LEAK_OPS) // 2 and "misses" not in calls["get"]
    assert open_fds() - fds_before <= 8, f"{open_fds() - fds_before} more file descriptors after {LEAK_OPS} ops"
    assert rss_growth_mib < 40, f"RSS grew {rss_growth_mib:.1f} MiB over {LEAK_OPS} ops"
