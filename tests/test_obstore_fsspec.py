"""The obstore and fsspec backends against a real S3 server (moto, SigV4 enforced) and fsspec's local protocol."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest

import kvstore
from kvstore.errors import AuthError, BucketNotFound, InvalidKey, PreconditionFailed, StoreTimeout, StoreUnavailable

pytestmark = pytest.mark.servers

BACKENDS = ("obstore", "fsspec")
MiB = 1024 * 1024


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    return request.param


@pytest.fixture
def moto(s3_servers):
    return s3_servers.get("moto")


@pytest.fixture
def bucket(moto, unique_name):
    name = unique_name("b")
    moto.create_bucket(name)
    yield name
    moto.delete_bucket(name)


def open_store(server, bucket, backend, prefix="p", **overrides):
    return kvstore.open(server.url(bucket, prefix), server.extra_config(kvstore_backend=backend, **overrides))


@pytest.fixture
def store(moto, bucket, backend_name):
    with open_store(moto, bucket, backend_name) as s:
        yield s
        s.delete_many(list(s.list()))


@pytest.mark.parametrize("size", [0, 1, 5 * MiB + 1, 64 * MiB], ids=["0B", "1B", "5MiB+1", "64MiB"])
def test_round_trip(store, size):
    data = os.urandom(size) if size < MiB else np.random.default_rng(size).integers(0, 256, size, np.uint8).tobytes()
    store.put("obj", data)
    assert store.get("obj") == data
    assert store.stat("obj").size == size
    buffer = np.zeros(size + 7, np.uint8)
    assert store.get_into("obj", buffer) == size
    assert buffer[:size].tobytes() == data
    assert not buffer[size:].any()


@pytest.mark.parametrize("target", ["numpy", pytest.param("torch", marks=pytest.mark.lmcache)])
def test_get_into_64mib_without_a_full_size_copy(store, target):
    """Peak RSS, not tracemalloc: obstore's buffers live in Rust and botocore's in C, out of tracemalloc's sight."""
    from kvstore.bench.runner import PeakRss

    data = np.random.default_rng(64).integers(0, 256, 64 * MiB, np.uint8)
    store.put("big", data)
    if target == "torch":
        torch = pytest.importorskip("torch")
        buffer = torch.ones(32 * MiB, dtype=torch.bfloat16)  # touched, so its pages are resident already
        as_bytes = lambda: buffer.view(torch.uint8).numpy()  # noqa: E731
    else:
        buffer = np.ones(64 * MiB, np.uint8)
        as_bytes = lambda: buffer  # noqa: E731
    # Warm connections and pools on a small object: a 64 MiB warm-up could leave freed native
    # buffers resident that the measured read then reuses unseen.
    store.put("warm", b"w" * MiB)
    store.get_into("warm", bytearray(MiB))
    with PeakRss() as rss:
        assert store.get_into("big", buffer) == 64 * MiB
    assert np.array_equal(as_bytes(), data)
    assert rss.growth < 32 * MiB, f"RSS grew {rss.growth / MiB:.0f} MiB reading 64 MiB"


@pytest.mark.parametrize("key", ["ünï cödé/x", "with space", "100%/done", "a+b=c", "deep/er/path/key"])
def test_awkward_keys(store, key):
    store.put(key, key.encode())
    assert store.get(key) == key.encode()
    assert key in list(store.list())


def test_names_obstore_would_rewrite_are_refused(store):
    for key in ("a//b", "a/./b", "../up", "trailing/"):
        with pytest.raises(InvalidKey):
            store.put(key, b"x")


def test_metadata_round_trip(store):
    store.put("m", b"payload", {"layer": "7", "model-id": "llama_3"})
    info = store.stat("m")
    assert info.metadata["layer"] == "7" and info.metadata["model-id"] == "llama_3"
    assert "content-type" not in {k.lower() for k in info.metadata}
    result = store.backend.get_into(store.name_of("m"), memoryview(bytearray(16)))
    assert result.metadata["layer"] == "7"


def test_get_into_numpy_and_buffer_too_small(store):
    data = np.arange(4096, dtype=np.float16)
    store.put("arr", data)
    out = np.empty_like(data)
    assert store.get_into("arr", out) == data.nbytes
    assert np.array_equal(out, data)
    small = bytearray(data.nbytes - 1)
    with pytest.raises(kvstore.errors.BufferTooSmall):
        store.get_into("arr", small)
    assert not any(small)


def test_miss_and_delete_twice(store):
    assert store.get("absent") is None
    assert store.get_into("absent", bytearray(4)) is None
    assert store.stat("absent") is None
    store.put("gone", b"1")
    assert store.delete("gone") is True
    assert store.delete("gone") is False
    store.put("x1", b"1")
    store.put("x2", b"2")
    assert store.delete_many(["x1", "nope", "x2"]) == [True, False, True]
    assert store.get("x1") is None


def test_list_with_prefixes(store):
    for key in ("a/1", "a/2", "ab/1", "abc", "b/1"):
        store.put(key, b"v")
    assert sorted(store.list("a/")) == ["a/1", "a/2"]
    assert sorted(store.list("ab")) == ["ab/1", "abc"]
    assert sorted(store.list("a")) == ["a/1", "a/2", "ab/1", "abc"]
    assert sorted(store.list()) == ["a/1", "a/2", "ab/1", "abc", "b/1"]
    assert list(store.list("zzz")) == []
    assert {i.key: i.size for i in store.scan("b")} == {"b/1": 1}


def test_conditional_put(store):
    assert store.backend.capabilities.conditional_put
    store.put("once", b"first", if_absent=True)
    with pytest.raises(PreconditionFailed):
        store.put("once", b"second", if_absent=True)
    assert store.get("once") == b"first"


def test_concurrent_batches(store):
    items = {f"k{i}": os.urandom(1000 + i) for i in range(24)}
    store.put_many(items)
    assert store.get_many(list(items)) == list(items.values())


@pytest.mark.parametrize("content", [None, b"", b"not a certificate"], ids=["missing", "empty", "garbage"])
def test_unusable_ca_bundle_is_a_config_error(moto, bucket, backend_name, tmp_path, content):
    bundle = tmp_path / "ca.pem"
    if content is not None:
        bundle.write_bytes(content)
    with pytest.raises(kvstore.ConfigError, match="CA bundle") as info:
        open_store(moto, bucket, backend_name, s3_endpoint_url=f"https://127.0.0.1:{moto.port}",
                   s3_ca_bundle=str(bundle))
    assert info.value.key == "s3_ca_bundle"


def test_wrong_keys_raise_auth_error(moto, bucket, backend_name):
    with open_store(moto, bucket, backend_name, aws_secret_access_key="not-the-secret") as s:
        with pytest.raises(AuthError) as caught:
            s.put("k", b"x")
        assert "not-the-secret" not in str(caught.value)


def test_missing_bucket_raises_bucket_not_found(moto, unique_name, backend_name):
    with open_store(moto, unique_name("missing"), backend_name) as s:
        with pytest.raises(BucketNotFound):
            s.put("k", b"x")
        with pytest.raises(BucketNotFound):
            s.get("k")
        with pytest.raises(BucketNotFound):
            s.stat("k")


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_dead_endpoint_fails_within_timeout(moto, backend_name, kind):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if kind == "silent":
        listener.listen(64)  # accepts connections, never answers
    else:
        listener.close()  # nothing listens: connection refused
    config = moto.extra_config(kvstore_backend=backend_name, kvstore_timeout_s="2", kvstore_connect_timeout_s="1",
                               s3_endpoint_url=f"http://127.0.0.1:{port}")
    try:
        with kvstore.open("s3://dead/p", config) as s:
            started = time.monotonic()
            with pytest.raises((StoreUnavailable, StoreTimeout)):
                s.get("k")
            assert time.monotonic() - started < 8
    finally:
        listener.close()


def test_fsspec_profile_local_protocol(tmp_path):
    config = kvstore.resolve(f"local://{tmp_path}/root")
    assert (config.profile, config.backend) == ("fsspec", "fsspec")
    (tmp_path / "root").mkdir()
    with kvstore.open(f"local://{tmp_path}/root") as s:
        assert not s.backend.capabilities.metadata
        s.put("dir/obj", b"abc")
        s.put("other", b"")
        assert s.get("dir/obj") == b"abc"
        assert s.get("other") == b""
        buffer = bytearray(8)
        assert s.get_into("dir/obj", buffer) == 3 and buffer[:3] == b"abc"
        assert sorted(s.list()) == ["dir/obj", "other"]
        assert sorted(s.list("d")) == ["dir/obj"]
        assert s.get("absent") is None
        assert s.delete("dir/obj") is True and s.delete("dir/obj") is False
        with pytest.raises(InvalidKey):
            s.put("../escape", b"x")
    assert not (tmp_path / "escape").exists()


def test_fsspec_profile_missing_root(tmp_path):
    with kvstore.open(f"local://{tmp_path}/nothing-here") as s:
        with pytest.raises(BucketNotFound):
            s.put("k", b"x")


def test_file_profile_through_fsspec(tmp_path):
    with kvstore.open(str(tmp_path), {"kvstore_backend": "fsspec"}) as s:
        assert s.config.profile == "file"
        s.put("a/b", b"12345")
        assert s.get("a/b") == b"12345"
        assert (tmp_path / "a" / "b").read_bytes() == b"12345"
