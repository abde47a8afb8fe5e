"""Process supervision: ``ManagedServer`` starts each server process as the leader of a process group,
logs under a private state directory, waits for its port, and stops it by PID (process group), also at
interpreter exit and, through a guard process, when this process dies without doing either."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

from kvstore.testing.servers.endpoint import Limit, S3Server, forget_clients
from kvstore.testing.servers.net import _tcp_open, _v6_socket

__all__ = ["ManagedServer", "ServerStartError"]


class ServerStartError(RuntimeError):
    """The server was launched but did not come up (or died); the message ends with its log tail."""


_LIVE: weakref.WeakSet[ManagedServer] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for srv in list(_LIVE):
        with contextlib.suppress(Exception):
            srv.stop()


def _popen(cmd: Sequence[str | os.PathLike[str]], log: Path, *, env: dict | None = None, cwd: str | Path | None = None):
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
                forget_clients(self.server)
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

    def _spawn(self, cmd: Sequence[str | os.PathLike[str]], log_name: str, **kw: Any) -> subprocess.Popen:
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
                    raise self._fail(f"{what}: process {cast(Sequence[str], p.args)[0]} exited with status {p.returncode}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise self._fail(f"{what}: not ready before the deadline (start timeout {self.start_timeout:.0f} s)")
            time.sleep(interval)

    def _wait_for_banner(self, what: str, log_name: str, banner: bytes, deadline: float) -> None:
        """Wait until the front end has written ``banner`` (it bound the port itself, not another program
        that took the port first) and the port accepts connections."""
        log = self._log(log_name)
        assert self._front is not None, "the front end was spawned first"
        self._wait(what, lambda: banner in log.read_bytes() and _tcp_open(self.port), deadline, [self._front], 0.05)

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

