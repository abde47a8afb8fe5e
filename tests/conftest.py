"""Shared fixtures: real S3 servers on loopback, started once per session and stopped by PID."""

from __future__ import annotations

import uuid

import pytest

SERVER_NAMES = ("moto", "seaweedfs", "ceph")


class ServerPool:
    """Starts each server the first time a test asks for it; stops them all at the end."""

    def __init__(self) -> None:
        self._running: dict[str, object] = {}

    def get(self, name: str):
        from kvstore.testing import servers

        if name not in self._running:
            reason = servers.available(name)
            if reason:
                pytest.skip(f"{name} cannot run here: {reason}")
            self._running[name] = servers.start(name)
        return self._running[name].server

    def managed(self, name: str):
        self.get(name)
        return self._running[name]

    def stop_all(self) -> None:
        for managed in self._running.values():
            managed.stop()
        self._running.clear()


@pytest.fixture(scope="session")
def s3_servers():
    pool = ServerPool()
    yield pool
    pool.stop_all()


@pytest.fixture
def unique_name():
    """A fresh lowercase name usable as a bucket or a prefix."""
    return lambda stem="t": f"{stem}-{uuid.uuid4().hex[:12]}"


S3_BACKENDS = ["crt", "obstore", "fsspec"]


@pytest.fixture(params=S3_BACKENDS)
def backend(request):
    """Each S3 backend by name, skipped where its client library is not installed."""
    from kvstore.backends import backend_class

    try:
        backend_class(request.param)
    except (ImportError, ModuleNotFoundError) as exc:
        pytest.skip(f"{request.param} backend not available: {exc}")
    return request.param
