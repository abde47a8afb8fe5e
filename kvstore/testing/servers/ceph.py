"""Ceph RGW: a single-node Ceph cluster (mon + memstore OSD + radosgw), cephx off, SigV4 keys made with
``radosgw-admin``.  Needs the Debian packages ceph-mon, ceph-osd, radosgw (``scripts/install-test-servers.sh``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

from kvstore.testing.servers.endpoint import S3Server, _signed_probe, boto3_missing, raise_if_unavailable
from kvstore.testing.servers.net import _tcp_open, free_ports
from kvstore.testing.servers.process import ManagedServer, _end_processes, _with_port_retry

__all__ = ["CephServer", "ceph_missing", "start_ceph"]

START_TIMEOUT = 180.0  # seconds
_CEPH_BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")
_CEPH_PACKAGES = "ceph-mon ceph-osd radosgw"


def ceph_missing() -> str | None:
    """None when the Ceph daemons can run here (boto3 aside), else why not."""
    if not sys.platform.startswith("linux"):
        return "Ceph RGW test cluster runs on Linux only"
    missing = [b for b in _CEPH_BINARIES if shutil.which(b) is None]
    if missing:
        return (f"Ceph binaries not found ({', '.join(missing)}): as root on Debian/Ubuntu run "
                f"scripts/install-test-servers.sh (apt-get install {_CEPH_PACKAGES})")
    return None


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
        assert self.server is not None, "set by _launch_frontend"
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
    raise_if_unavailable(boto3_missing() or ceph_missing())
    if memstore_bytes is None:
        memstore_bytes = int(os.environ.get("KVSTORE_CEPH_MEMSTORE_BYTES", 6 << 30))
    return _with_port_retry(
        lambda: CephServer(start_timeout=timeout or START_TIMEOUT, memstore_bytes=memstore_bytes)
    )

