"""Reads hand each piece on as it lands, and the integrity layer checksums those pieces, not the buffer again."""

from __future__ import annotations

import numpy as np
import pytest

import kvstore
from kvstore.backends.base import PIECE
from kvstore.layers import integrity

pytestmark = pytest.mark.servers

SIZE = 10 * PIECE + 123  # two 8 MiB CRT parts, eleven pieces, a short last one
STREAMING = ("crt", "obstore", "fsspec", "file")


@pytest.fixture(params=STREAMING + ("memory",))
def store(request, s3_servers, tmp_path, unique_name):
    name = request.param
    if name == "file":
        url, extra = str(tmp_path / "store"), {}
    elif name == "memory":
        url, extra = f"memory://{unique_name()}", {"kvstore_checksum": "crc32c"}  # off by default in memory
    else:
        moto = s3_servers.get("moto")
        bucket = unique_name("b")
        moto.create_bucket(bucket)
        url, extra = moto.url(bucket, "p"), moto.extra_config(kvstore_backend=name)
    with kvstore.open(url, extra) as s:
        s.kind = name
        yield s


@pytest.fixture
def data():
    return np.random.default_rng(3).integers(0, 256, SIZE, np.uint8).tobytes()


def test_pieces_are_the_landed_bytes_in_order(store, data):
    store.put("k", data)
    buffer = bytearray(SIZE + 10)
    pieces: list[tuple[int, bytes]] = []
    result = store.backend.get_into(store.name_of("k"), memoryview(buffer), lambda at, p: pieces.append((at, bytes(p))))
    assert result is not None and result.size == SIZE and buffer[:SIZE] == data
    if store.kind == "memory":
        assert pieces == []  # one copy from memory: nothing to hand on, and the layer checks the buffer
        return
    offsets = [at for at, _ in pieces]
    assert offsets[0] == 0 and all(b == a + len(p) for (a, p), b in zip(pieces, offsets[1:])), offsets
    assert offsets[-1] + len(pieces[-1][1]) == SIZE
    assert all(data[at:at + len(p)] == p for at, p in pieces)
    largest = max(len(p) for _, p in pieces)
    # 1 MiB pieces, not parts; obstore joins network chunks until it has at least that much
    assert largest <= (2 * PIECE if store.kind == "obstore" else PIECE), largest


def test_checksum_reads_each_byte_once(store, data, monkeypatch):
    store.put("k", data)
    checked: list[int] = []
    real = integrity.crc32c
    monkeypatch.setattr(integrity, "crc32c", lambda d, *prev: (checked.append(len(d)), real(d, *prev))[1])
    assert store.get_into("k", bytearray(SIZE)) == SIZE
    assert sum(checked) == SIZE, f"checksummed {sum(checked)} bytes of a {SIZE}-byte object"
    if store.kind in STREAMING:
        assert len(checked) > 1, "the checksum ran over the whole buffer after the read, not on the pieces"
    else:
        assert checked == [SIZE]  # no pieces handed on: the whole buffer, once
