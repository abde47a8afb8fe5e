"""The embedded file store: OS errors, a missing root, killed writers, races, links and long names."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import kvstore
from kvstore.backends import call, file_paths
from kvstore.backends.file import FileBackend
from kvstore.cli.common import EXIT_STORE
from kvstore.cli.main import main
from kvstore.errors import BucketNotFound, BufferTooSmall, InvalidKey, StoreUnavailable


def _backend(root) -> FileBackend:
    return FileBackend(kvstore.resolve(str(root)))


# -- OS errors are store errors that name the key -----------------------------------------------
def test_a_file_where_a_directory_belongs_is_a_store_error_naming_the_key(tmp_path, capsys):
    root = tmp_path / "root"
    with kvstore.open(str(root)) as s:
        s.put("ok", b"1")
        (root / "sub").write_bytes(b"not a directory")
        for op in (lambda: s.put("sub/x", b"v"), lambda: s.get("sub/x"), lambda: s.stat("sub/x"),
                   lambda: s.get_into("sub/x", bytearray(1)), lambda: s.delete("sub/x")):
            with pytest.raises(StoreUnavailable) as info:
                op()
            assert not info.value.retryable and "'sub/x'" in str(info.value) and "#tmp" not in str(info.value)
        os.mkfifo(root / "fifo#")  # opened as an object it would hang a reader
        with pytest.raises(StoreUnavailable, match="'fifo'"):
            s.get("fifo")
        assert list(s.list()) == ["ok"]
    (tmp_path / "v").write_bytes(b"v")
    assert main(["put", str(root), "sub/x", str(tmp_path / "v")]) == EXIT_STORE
    assert "'sub/x'" in capsys.readouterr().err


def _denied_ops(root: str, value_file: str) -> dict:
    """What a user without write access meets: each operation's error, and the CLI's exit codes."""
    out = {}
    with kvstore.open(root) as s:
        for op, fn in (("put", lambda: s.put("dir/k", b"v")), ("get", lambda: s.get("readable"))):
            try:
                fn()
                out[op] = ["no error", ""]
            except Exception as exc:  # reported to the parent, asserted there
                out[op] = [type(exc).__name__, str(exc)]
    out["cli_put"] = main(["put", root, "dir/k", value_file])
    out["cli_get"] = main(["get", root, "readable", "-o", os.devnull])
    return out


def test_permission_denied_is_store_unavailable_and_cli_exit_3(tmp_path):
    base = tempfile.mkdtemp()  # not under pytest's 0700 tmp dir: another user must reach it
    try:
        os.chmod(base, 0o755)
        root, value_file = os.path.join(base, "store"), os.path.join(base, "v")
        with open(value_file, "w") as f:
            f.write("v")
        with kvstore.open(root) as s:
            s.put("readable", b"secret bytes")
        os.chmod(next(os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns if n == "readable#"), 0o600)
        os.chmod(root, 0o555)
        if os.geteuid() != 0:
            result = _denied_ops(root, value_file)
        else:  # root ignores permissions: run the operations in a child that is nobody
            reader, writer = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    os.write(writer, json.dumps(_denied_ops(root, value_file)).encode())
                finally:
                    os._exit(0)
            os.close(writer)
            with os.fdopen(reader) as r:
                result = json.loads(r.read())
            os.waitpid(pid, 0)
        for op, key in (("put", "'dir/k'"), ("get", "'readable'")):
            kind, message = result[op]
            assert kind == "StoreUnavailable" and key in message and "ermission denied" in message, result
            assert "#tmp" not in message
        assert result["cli_put"] == result["cli_get"] == EXIT_STORE
    finally:
        os.chmod(os.path.join(base, "store"), 0o755)
        shutil.rmtree(base)


def test_objects_are_created_with_the_process_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with kvstore.open(str(tmp_path / "root")) as s:
            s.put("d/k", b"v")
    finally:
        os.umask(old)
    (object_file,) = (tmp_path / "root").rglob("k#")
    assert object_file.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "root" / "d").stat().st_mode & 0o777 == 0o755


# -- a missing root ----------------------------------------------------------------------------
def test_reads_of_a_missing_root_are_bucket_not_found_and_create_nothing(tmp_path, capsys):
    root = tmp_path / "nowhere" / "root"
    with kvstore.open(str(root)) as s:
        for op in (lambda: s.get("k"), lambda: s.get_into("k", bytearray(4)), lambda: s.stat("k"),
                   lambda: s.exists("k"), lambda: list(s.list()), lambda: s.delete("k"),
                   lambda: s.exists_many(["k"]), lambda: asyncio.run(s.aget("k"))):
            with pytest.raises(BucketNotFound, match=str(root)):
                op()
    for argv in (["ls", str(root)], ["get", str(root), "k"], ["stat", str(root), "k"]):
        assert main(argv) == EXIT_STORE
        assert "BucketNotFound" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()
    with kvstore.open(str(root)) as s:
        s.put("a/b/k", b"v")  # a write makes the root and the directories it needs
        assert s.get("a/b/k") == b"v" and s.get("other") is None and list(s.list()) == ["a/b/k"]


# -- writers killed mid-put ----------------------------------------------------------------------
_KILLED_WRITER = """
import os, sys, time, kvstore
def stall(fd):  # the bytes are in the temp file; stop here until killed
    print("written", flush=True)
    time.sleep(60)
os.fsync = stall
with kvstore.open(sys.argv[1], {"kvstore_fsync": "true"}) as s:
    s.put("lost/k", b"x" * 1_000_000)
"""


def test_temp_files_of_a_killed_writer_are_found_and_removed(tmp_path):
    root = tmp_path / "root"
    with kvstore.open(str(root)) as s:
        s.put("dir/done", b"kept")
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "written"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    assert writer.returncode == -signal.SIGKILL
    backend = _backend(root)
    assert [info.key for info in backend.list("")] == ["dir/done"]  # a temp file is not an object

    (found,) = backend.stale_temp_files(0)
    path, size, age = found
    assert path.startswith("lost/k#tmp.") and (root / path).is_file()
    assert size == (root / path).stat().st_size and size > 1_000_000 and 0 <= age < 60
    assert backend.stale_temp_files(3600) == [] and backend.remove_stale_temp_files(3600) == (0, 0)
    old = time.time() - 7200
    os.utime(root / path, (old, old))
    assert [(p, n) for p, n, a in backend.stale_temp_files(3600) if a >= 7200] == [(path, size)]

    assert backend.remove_stale_temp_files(3600) == (1, size)
    assert backend.stale_temp_files(0) == [] and not (root / "lost").exists()  # its empty directory went too
    with kvstore.open(str(root)) as s:
        assert s.get("dir/done") == b"kept"
    with pytest.raises(BucketNotFound):
        _backend(tmp_path / "missing").stale_temp_files(0)


# -- races ----------------------------------------------------------------------------------
def test_put_racing_delete_in_the_same_directory_lands(tmp_path):
    errors: list[BaseException] = []
    with kvstore.open(str(tmp_path / "root"), {"kvstore_max_inflight": "8"}) as s:
        def worker(n: int) -> None:
            for i in range(120):
                key, value = f"deep/shared/dir/w{n}-{i}", f"{n}-{i}".encode()
                try:
                    s.put(key, value)
                    assert s.get(key) == value
                    assert s.delete(key)
                except BaseException as exc:  # surfaced below; the others go on racing
                    errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert list(s.list()) == [] and list((tmp_path / "root").iterdir()) == []


def test_get_of_an_object_replaced_by_a_larger_one_reads_the_new_size(tmp_path):
    small, large = b"s" * 100, b"L" * 200_000
    stop, errors, seen = threading.Event(), [], set()
    with kvstore.open(str(tmp_path / "root"), {"kvstore_max_inflight": "4"}) as s:
        s.put("k", small)

        def writer() -> None:
            while not stop.is_set():
                s.put("k", large)
                s.put("k", small)

        t = threading.Thread(target=writer)
        t.start()
        try:
            for _ in range(1500):
                try:
                    value = s.get("k")
                    seen.add(len(value))
                    assert value in (small, large)
                except BufferTooSmall as exc:
                    errors.append(exc)
        finally:
            stop.set()
            t.join()
        assert errors == [] and seen == {len(small), len(large)}
        s.put("k", large)
        with pytest.raises(BufferTooSmall):
            s.get_into("k", bytearray(len(large) - 1))  # a buffer that really is too small


# -- links and long names ---------------------------------------------------------------------
def test_symlinks_inside_the_root_are_not_followed(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    outside.mkdir()
    with kvstore.open(str(root)) as s:
        s.put("real", b"payload")
        (planted,) = root.glob("real#")
        shutil.copy(planted, outside / "x#")  # a valid object file, reachable only through the links
        (root / "sub").symlink_to(outside)
        (root / "alias#").symlink_to(outside / "x#")
        reads = (lambda k: s.get(k), lambda k: s.stat(k), lambda k: s.get_into(k, bytearray(16)), lambda k: s.delete(k))
        for key, ops in (("sub/x", reads + (lambda k: s.put(k, b"v"),)), ("alias", reads)):
            for op in ops:
                with pytest.raises(StoreUnavailable, match="symbolic link"):
                    op(key)
        assert list(s.list()) == ["real"]  # links are skipped, not followed
        s.put("alias", b"v")  # replaces the link itself, as a rename does
        assert s.get("alias") == b"v" and not (root / "alias#").is_symlink()
        assert sorted(p.name for p in outside.iterdir()) == ["x#"]  # nothing written or removed out there
        assert (outside / "x#").read_bytes() == planted.read_bytes()


def test_a_name_too_long_for_the_file_system_is_invalid_key(tmp_path, monkeypatch):
    monkeypatch.setattr(file_paths, "SEGMENT_MAX", 400)  # as if segments were not split at 200 bytes
    with kvstore.open(str(tmp_path / "root")) as s:
        key = "k" * 300
        for op in (lambda: s.put(key, b"v"), lambda: s.get(key), lambda: s.stat(key)):
            with pytest.raises(InvalidKey, match="too long for the file system") as info:
                op()
            assert "#tmp" not in str(info.value)


def test_a_path_longer_than_path_max_still_round_trips(tmp_path):
    root = tmp_path.joinpath(*["d" * 200] * 7)  # about 1,400 characters before the key's 3,100
    key = "%" * 1024  # each byte encodes to three characters
    with kvstore.open(str(root)) as s:
        s.put(key, b"v")
        assert s.get(key) == b"v" and list(s.list()) == [key] and s.delete(key)


# -- the caller's buffer is written only through the call's lease ----------------------------
def test_a_revoked_lease_stops_the_read_with_call_abandoned(tmp_path):
    from kvstore.backends.base import PIECE

    backend = _backend(tmp_path / "root")
    backend.put("big", memoryview(b"A" * (3 * PIECE)), {})
    buffer = bytearray(3 * PIECE)
    lease = call.BufferLease()

    def revoke_after_first_piece(offset: int, piece: memoryview) -> None:
        lease.revoke("cancelled by the test")

    with call.running(call.Call(10.0, lease)), pytest.raises(call.CallAbandoned):
        backend.get_into("big", memoryview(buffer), revoke_after_first_piece)
    assert bytes(buffer[:PIECE]) == b"A" * PIECE and buffer[PIECE:] == bytes(2 * PIECE)


def test_a_cancelled_read_never_writes_the_reused_buffer(tmp_path):
    size = 16 << 20
    with kvstore.open(str(tmp_path / "root")) as s:
        s.put("A", b"a" * size)
        s.put("B", b"b" * size)
        buffer = bytearray(size)

        async def run() -> None:
            for i in range(12):
                task = asyncio.create_task(s.aget_into("A", buffer))
                await asyncio.sleep(0.0005 * i)
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                assert await s.aget_into("B", buffer) == size  # never a spurious IntegrityError
                await asyncio.sleep(0.02)  # long enough for an abandoned 16 MiB read to have finished
                assert buffer.count(b"a") == 0

        asyncio.run(run())
