"""Translated errors keep the client's exception as ``__cause__``, and ``-vv`` shows it."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

import kvstore
from kvstore import KVStoreError
from kvstore.errors import AuthError, BucketNotFound, StoreUnavailable

pytestmark = [pytest.mark.servers, pytest.mark.timeout(120)]


def _root_cause(exc: BaseException) -> BaseException:
    link = exc
    while isinstance(link, KVStoreError) and link.__cause__ is not None:
        link = link.__cause__
    return link


def _dead_endpoint() -> str:
    """A loopback port nobody listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _config(server, backend: str, **overrides):
    return server.extra_config(kvstore_backend=backend, kvstore_timeout_s=5, kvstore_connect_timeout_s=1,
                               kvstore_max_retries=0, kvstore_breaker_threshold=0, **overrides)


def _failure(fn) -> KVStoreError:
    with pytest.raises(KVStoreError) as info:
        fn()
    return info.value


def test_each_translated_error_keeps_the_clients_exception(s3_servers, unique_name, backend):
    moto = s3_servers.get("moto")
    bucket = unique_name("cause")
    moto.create_bucket(bucket)
    cases = {
        BucketNotFound: (f"s3://{unique_name('absent')}/p", _config(moto, backend)),
        AuthError: (f"s3://{bucket}/p", _config(moto, backend, aws_secret_access_key="not-the-secret")),
        StoreUnavailable: (f"s3://{bucket}/p", _config(moto, backend, s3_endpoint_url=_dead_endpoint())),
    }
    for kind, (url, extra) in cases.items():
        with kvstore.open(url, extra) as store:
            for name, read in (("stat", lambda: store.stat("k")), ("get", lambda: store.get("k")),
                               ("put", lambda: store.put("k", b"x"))):
                error = _failure(read)
                assert isinstance(error, kind), (backend, name, kind, error)
                assert error.__cause__ is not None, f"{backend} {name}: the client's exception is lost: {error!r}"
                root = _root_cause(error)
                assert not isinstance(root, KVStoreError), f"{backend} {name}: the chain ends in our own {root!r}"


def test_the_file_stores_errors_keep_the_os_error(tmp_path):
    (tmp_path / "root").write_text("a file where the store's directory should be")
    with kvstore.open(str(tmp_path / "root" / "store"), {}) as store:
        error = _failure(lambda: store.put("k", b"x"))
    assert isinstance(error.__cause__, OSError), repr(error)


def test_very_verbose_cli_shows_the_cause_chain(s3_servers, unique_name):
    moto = s3_servers.get("moto")
    extra = _config(moto, "crt", s3_endpoint_url=_dead_endpoint())
    argv = ["-vv", "stat", f"s3://{unique_name('cli')}/p", "k"]
    for key, value in extra.items():
        argv += ["--set", f"{key}={value}"]
    code = "import sys; from kvstore.cli.main import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "The above exception was the direct cause of the following exception" in result.stderr, result.stderr
    assert "StoreUnavailable" in result.stderr
    assert moto.secret_key not in result.stderr
