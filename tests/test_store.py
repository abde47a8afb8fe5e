"""KVStore over the embedded backends: the API contract, key safety, import cost."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvstore
from kvstore.errors import BufferTooSmall, InvalidKey, KVStoreError, PreconditionFailed


@pytest.fixture(params=["memory", "file"])
def store(request, tmp_path, unique_name):
    url = f"memory://{unique_name()}" if request.param == "memory" else str(tmp_path / "store")
    with kvstore.open(url, {"kvstore_max_inflight": "4"}) as s:
        yield s


def test_object_name_is_prefix_slash_key(tmp_path):
    with kvstore.open(f"file://{tmp_path}/root", {"s3_file_prefix": "team/a"}) as s:
        assert s.name_of("m@1@0@ab@bfloat16") == "team/a/m@1@0@ab@bfloat16"
        s.put("k", b"v")
        assert list(s.list()) == ["k"]
    with kvstore.open(f"file://{tmp_path}/root") as whole:
        assert list(whole.list()) == ["team/a/k"]


def test_sync_batch_and_results_in_order(store):
    store.put_many({f"k{i}": bytes([i]) * (i + 1) for i in range(10)})
    keys = ["k3", "nope", "k0", "k9"]
    assert store.get_many(keys) == [b"\x03" * 4, None, b"\x00", b"\x09" * 10]
    assert store.exists_many(keys) == [True, False, True, True]
    buffers = [bytearray(16) for _ in keys]
    assert store.get_into_many(keys, buffers) == [4, None, 1, 10]
    assert bytes(buffers[3][:10]) == b"\x09" * 10
    assert store.delete_many(["k3", "nope", "k3"]) == [True, False, False]
    assert sorted(store.list("k")) == [f"k{i}" for i in range(10) if i != 3]


@pytest.mark.lmcache
def test_get_into_buffer_kinds(store):
    import torch

    payload = os.urandom(4096)
    store.put("t", payload, {"dtype": "bfloat16", "shape": "2,1024"})
    arr = np.empty(4096, dtype=np.uint8)
    assert store.get_into("t", arr) == 4096 and arr.tobytes() == payload
    tensor = torch.empty(2, 1024, dtype=torch.bfloat16)
    assert store.get_into("t", tensor) == 4096
    assert tensor.view(torch.uint8).numpy().tobytes() == payload
    big = bytearray(5000)
    assert store.get_into("t", memoryview(big)) == 4096 and bytes(big[:4096]) == payload
    with pytest.raises(BufferTooSmall):
        store.get_into("t", bytearray(4095))
    with pytest.raises(ValueError):
        store.get_into("t", b"x" * 5000)  # read-only
    store.put("from-tensor", tensor)
    assert store.get("from-tensor") == payload
    info = store.stat("t")
    assert info.size == 4096 and info.metadata["dtype"] == "bfloat16" and info.metadata["shape"] == "2,1024"


def test_async_twins(store):
    async def run():
        await store.aput("a", b"1", {"x": "y"})
        await store.aput_many([("b", b"22"), ("c", b"333")])
        assert await store.aget("a") == b"1"
        assert await store.aget_many(["c", "zz"]) == [b"333", None]
        buf = bytearray(3)
        assert await store.aget_into("c", buf) == 3
        assert await store.aget_into_many(["b", "zz"], [bytearray(2), bytearray(2)]) == [2, None]
        assert await store.aexists("b") and not await store.aexists("zz")
        assert await store.aexists_many(["a", "zz"]) == [True, False]
        assert (await store.astat("a")).metadata["x"] == "y"
        assert [k async for k in store.alist()] == ["a", "b", "c"]
        assert await store.adelete("a") and not await store.adelete("a")
        assert await store.adelete_many(["b", "c", "b"]) == [True, True, False]

    asyncio.run(run())


def test_async_calls_do_not_block_the_loop(store):
    store.put("k", b"v" * 1000)

    async def run():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.gather(*(store.aget("k") for _ in range(50)))
        task.cancel()
        return ticks

    assert asyncio.run(run()) > 0


def test_conditional_put(store):
    store.put("once", b"1", if_absent=True)
    with pytest.raises(PreconditionFailed):
        store.put("once", b"2", if_absent=True)
    assert store.get("once") == b"1"


@pytest.mark.parametrize("key", ["", "a\x00b", "tab\there", "x" * 1100, "../../escape", "/abs/olute", "a/../../b",
                                 "..", ".", "a//b", "dir/"])
def test_invalid_keys(store, key):
    with pytest.raises(InvalidKey):
        store.put(key, b"v")


@pytest.mark.parametrize("metadata", [{"Upper": "x"}, {"k": "naïve"}, {"k": "line\nbreak"}, {"k": "v" * 3000}])
def test_invalid_metadata(store, metadata):
    store.put("other", b"x")  # the store exists (a file store's root is made by its first put)
    with pytest.raises(InvalidKey):
        store.put("k", b"v", metadata)
    assert store.get("k") is None


def test_close_is_idempotent_and_final(store):
    store.close()
    store.close()
    with pytest.raises(KVStoreError):
        store.get("k")


def test_thread_safety(store):
    errors = []

    def worker(n):
        try:
            for i in range(50):
                key = f"w{n}/{i % 5}"
                store.put(key, bytes([n]) * 100)
                got = store.get(key)
                assert got is not None and len(got) == 100 and len(set(got)) == 1
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(list(store.list("w"))) == 40


@pytest.mark.parametrize("key", ["nul%00", "%2e%2e/x", "..x/.y", "sp ace/ü/+%", "#/a#b", "k" * 1000])
def test_file_store_keys_stay_inside_root(tmp_path, key):
    root = tmp_path / "root"
    with kvstore.open(str(root)) as s:
        s.put(key, b"data")
        assert s.get(key) == b"data"
        assert list(s.list()) == [key]
        assert s.delete(key)
    outside = [p for p in tmp_path.rglob("*") if not str(p).startswith(str(root))]
    assert outside == []


def test_file_store_object_and_directory_of_same_name(tmp_path):
    with kvstore.open(str(tmp_path)) as s:
        s.put("a", b"1")
        s.put("a/b", b"2")
        assert (s.get("a"), s.get("a/b")) == (b"1", b"2")
        assert list(s.list()) == ["a", "a/b"]


def test_file_store_write_is_atomic(tmp_path):
    """A reader racing a writer sees a whole old or a whole new value."""
    with kvstore.open(str(tmp_path)) as s:
        old, new = b"o" * 1_000_000, b"n" * 1_000_000
        s.put("k", old)
        stop = threading.Event()
        seen = set()

        def reader():
            while not stop.is_set():
                value = s.get("k")
                seen.add(value[:1] + value[-1:] if value and len(set(value)) == 1 else b"torn")

        t = threading.Thread(target=reader)
        t.start()
        for i in range(20):
            s.put("k", new if i % 2 == 0 else old)
        stop.set()
        t.join()
        assert b"torn" not in seen and seen <= {b"oo", b"nn"}
        assert not [p for p in tmp_path.rglob("*#tmp.*")]


def test_file_store_concurrent_writers_leave_metadata_with_its_bytes(tmp_path):
    """Writers racing on one key: whichever wins, the metadata read back is the winner's own."""
    with kvstore.open(str(tmp_path), {"kvstore_max_inflight": "8"}) as s:
        values = {f"w{i}": bytes([i]) * 200_000 for i in range(4)}
        for _ in range(15):
            writers = [threading.Thread(target=s.put, args=("k", data, {"writer": w})) for w, data in values.items()]
            for t in writers:
                t.start()
            for t in writers:
                t.join()
            data, metadata = s.get("k"), s.stat("k").metadata
            assert values[metadata["writer"]] == data


def _metadata_length(raw: bytes) -> int:
    return int.from_bytes(raw[4:8], "little")


@pytest.mark.parametrize("damage", [
    lambda raw: raw[:3],  # shorter than a header
    lambda raw: b"XXXX" + raw[4:],  # not our magic (an older kvstore's data file, say)
    lambda raw: raw[:4] + b"\xff\xff\xff\x7f" + raw[8:],  # metadata longer than the file
    lambda raw: raw[:-1],  # the object's bytes cut short
    lambda raw: raw + b"!",  # more bytes than the header accounts for
    lambda raw: raw[:16] + b"x" + raw[17:],  # metadata that is not JSON
    lambda raw: raw[:16] + b"[" + b" " * (_metadata_length(raw) - 2) + b"]" + raw[16 + _metadata_length(raw):],  # JSON, no map
], ids=["short", "magic", "long-metadata", "truncated", "extended", "not-json", "not-a-map"])
@pytest.mark.parametrize("checksum", ["crc32c", "none"])
def test_file_store_damaged_object_is_an_integrity_error(tmp_path, damage, checksum):
    with kvstore.open(str(tmp_path), {"kvstore_checksum": checksum}) as s:
        s.put("k", b"abcdef", {"a": "b"})
        data_file = next(p for p in tmp_path.rglob("k#"))
        data_file.write_bytes(damage(data_file.read_bytes()))
        for read in (lambda: s.get("k"), lambda: s.stat("k"), lambda: s.get_into("k", bytearray(6))):
            with pytest.raises(kvstore.IntegrityError):
                read()
        assert list(s.list()) == ["k"]  # still there to be found, reported and removed
        assert s.delete("k") and list(s.list()) == []


def test_file_checksum_catches_bytes_changed_behind_the_store(tmp_path):
    with kvstore.open(str(tmp_path)) as s:
        s.put("k", b"abcdef")
        data_file = next(p for p in tmp_path.rglob("k#"))
        data_file.write_bytes(data_file.read_bytes()[:-1] + b"X")  # the object's last byte, header intact
        with pytest.raises(kvstore.IntegrityError):
            s.get("k")
        with pytest.raises(kvstore.IntegrityError):
            s.get_into("k", bytearray(6))


def test_missing_backend_dependency_names_the_extra():
    code = ("import sys, kvstore; sys.modules['obstore'] = None\n"
            "try:\n    kvstore.open('s3://b12', {'s3_region': 'x', 'kvstore_backend': 'obstore'})\n"
            "except kvstore.BackendUnavailable as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install kvcache-store-obstore" in out


def test_import_is_light():
    # What import costs is a benchmark figure (python -X importtime), not a timed test: what is
    # asserted is that no client library, torch or numpy is loaded by it.
    code = ("import sys; import kvstore\n"
            "print([m for m in ('awscrt', 'obstore', 'fsspec', 's3fs', 'torch', 'numpy', 'lmcache', 'boto3', 'yaml') if m in sys.modules])")
    heavy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert heavy.strip() == "[]"


@pytest.mark.parametrize("name", ["../../escape", "/abs", "a/../../b", "..", "a//b", "dir/"])
def test_file_backend_alone_keeps_odd_names_inside_root(tmp_path, name):
    """The store refuses such keys; the backend on its own still never leaves its root."""
    from kvstore.backends.file import FileBackend

    root = tmp_path / "root"
    backend = FileBackend(kvstore.resolve(str(root)))
    backend.put(name, memoryview(b"data"), {})
    assert backend.get(name)[0] == b"data"
    assert [info.key for info in backend.list("")] == [name]
    assert [p for p in tmp_path.rglob("*") if not str(p).startswith(str(root))] == []


@pytest.fixture(scope="module")
def fuzz_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    with kvstore.open("memory://fuzz") as memory, kvstore.open(str(root / "store")) as file:
        yield root, [memory, file]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_fuzz_keys_are_refused_cleanly_or_round_trip(fuzz_stores, key):
    root, stores = fuzz_stores
    for store in stores:
        try:
            store.put(key, b"v")
        except InvalidKey:
            continue
        assert store.get(key) == b"v"
        assert key in set(store.list())
        assert store.delete(key)
    assert all(str(p).startswith(str(root / "store")) for p in root.rglob("*"))


def test_plain_http_to_a_public_host_warns_once(caplog):
    extra = {"s3_region": "us-east-1", "aws_access_key_id": "AKIAEXAMPLE", "aws_secret_access_key": "s3cr3t-value"}
    with caplog.at_level("WARNING", logger="kvstore"):
        for _ in range(2):
            kvstore.open("s3://b12/p", {**extra, "s3_endpoint_url": "http://objects.example.com:9000"}).close()
        kvstore.open("s3://b12/p", {**extra, "s3_endpoint_url": "http://127.0.0.1:9000"}).close()
        kvstore.open("s3://b12/p", {**extra, "s3_endpoint_url": "http://minio.kv.svc.cluster.local:9000"}).close()
        kvstore.open("s3://test-127.cwlota.com", {**extra, "disable_tls": True}).close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "kvstore"]
    assert len(warnings) == 1 and "objects.example.com" in warnings[0]
    assert "s3cr3t-value" not in caplog.text
