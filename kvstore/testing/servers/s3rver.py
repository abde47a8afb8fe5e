"""s3rver (npm, Node.js) on loopback: a fourth, independent S3 implementation for the test matrix.

``scripts/install-test-servers.sh`` installs it into the project-local ``.test-servers/``
(``npm install s3rver@3.7.1``); ``KVSTORE_S3RVER`` may name another ``s3rver.js`` (or its
package directory).  The process supervision (process group, guard, stop by PID) is
``kvstore.testing.servers.process.ManagedServer``'s.

What s3rver does not implement is declared here as data (``LIMITS``): the conformance cases that
depend on it skip with that reason, and tests/test_servers.py checks that each limit is still
real, so a fixed server is noticed.  Its quirks that kvstore must handle (a foreign XML namespace
URI, a 206 with ``Content-Range: bytes 0-0/0`` for the empty object) are not limits: those cases
stay on.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from kvstore.testing.servers.endpoint import Limit, S3Server, ServerUnavailable, _signed_probe, raise_if_unavailable
from kvstore.testing.servers.net import LOOPBACK, free_port
from kvstore.testing.servers.process import ManagedServer, _with_port_retry

__all__ = ["LIMITS", "S3RVER_VERSION", "S3rverServer", "s3rver_missing", "s3rver_script", "start_s3rver"]

S3RVER_VERSION = "3.7.1"
# s3rver's one built-in account; it looks the access key id up but never checks a V4 signature.
ACCESS_KEY = SECRET_KEY = "S3RVER"
START_TIMEOUT = 60.0

LIMITS: tuple[Limit, ...] = (
    Limit("sigv4", "checks no SigV4 signature (V4 verification is unimplemented): a wrong secret key is "
          "accepted, only an unknown access key id is refused",
          ("error-auth", "error-auth-reads", "error-auth-async")),
    Limit("conditional-put", "ignores If-None-Match on PUT: a second put(if_absent=True) overwrites the first",
          ("conditional-put",)),
    Limit("delete-objects-whitespace", "trims the whitespace around each key of a DeleteObjects request "
          "(fast-xml-parser's default) and reports the trimmed name deleted: a bulk delete of 'a key ' "
          "removes nothing and says it did", ("key-spaces",)),
    Limit("list-order", "lists an object 'a/1' before 'a-x' and 'a.y' (a directory's objects first), not in "
          "S3's byte order", ("list-order",)),
    Limit("list-resume", "lists in its own order but filters start-after by name: a listing resumed after "
          "'a/b/2' misses 'a-x' and 'a.y', listed after it but sorting before it. kvstore's retry of a failed "
          "page resumes that way", ("list-resume",)),
    Limit("atomic-overwrite", "overwrites an object in place, not atomically: a read racing a put sees "
          "a truncated object (416 InvalidRange, or bytes that fail their checksum)", ("concurrent-one-key",)),
)

_ROOT = Path(__file__).resolve().parents[3]  # the checkout, for an editable install
_INSTALL_HINT = f"bash scripts/install-test-servers.sh (npm install --prefix .test-servers s3rver@{S3RVER_VERSION})"


def s3rver_script() -> Path | None:
    """The ``s3rver.js`` entry point to run with node, or None when s3rver is not installed."""
    named = os.environ.get("KVSTORE_S3RVER")
    candidates = [Path(named)] if named else []
    candidates.append(_ROOT / ".test-servers" / "node_modules" / "s3rver")
    for cand in candidates:
        script = cand / "bin" / "s3rver.js" if cand.is_dir() else cand
        if script.is_file():
            return script
    return None


def s3rver_missing() -> str | None:
    """None when s3rver can run here, else why not."""
    if shutil.which("node") is None:
        return "node (Node.js) is not on PATH; s3rver needs it: apt-get install nodejs npm"
    if s3rver_script() is None:
        where = os.environ.get("KVSTORE_S3RVER") or str(_ROOT / ".test-servers")
        return f"s3rver is not installed in {where}: {_INSTALL_HINT}"
    return None


class S3rverServer(ManagedServer):
    """``node s3rver.js`` on a free port, objects as files in the state directory (kept across a
    restart), virtual-hosted names under ``s3.localhost``."""

    name = "s3rver"
    limits = LIMITS

    def __init__(self, *, start_timeout: float):
        super().__init__(start_timeout=start_timeout)
        script = s3rver_script()
        if script is None:
            raise ServerUnavailable(s3rver_missing() or "s3rver is not installed")
        self.script = script
        self.port = free_port()
        self._boot()

    def _prepare(self) -> None:
        (self.workdir / "data").mkdir()

    def _launch_frontend(self, timeout: float, first: bool) -> None:
        deadline = time.monotonic() + timeout
        # Listing continuation tokens are DES-encrypted; OpenSSL 3 (Node >= 17) has DES only in its
        # legacy provider, and without it every listing of more than one page is a 500.
        env = dict(os.environ, NODE_OPTIONS="--openssl-legacy-provider")
        cmd: list[str | os.PathLike[str]] = ["node", self.script, "-d", self.workdir / "data", "-a", LOOPBACK, "-p", str(self.port),
               "--service-endpoint", "localhost"]
        self._front = self._spawn(cmd, "s3rver.log", env=env, cwd=self.workdir)
        self._wait_for_banner("s3rver listening", "s3rver.log", f"S3rver listening on {LOOPBACK}:{self.port}".encode(),
                              deadline)
        # s3rver takes BUCKET.s3.<service endpoint> as virtual-hosted; BUCKET.localhost it reads
        # as a bucket named "BUCKET.localhost".
        self.server = S3Server.on_loopback("s3rver", self.port, ACCESS_KEY, SECRET_KEY, vhost_domain="s3.localhost")
        self._wait("s3rver signed request", _signed_probe(self.server), deadline, [self._front], 0.1)


def start_s3rver(*, timeout: float | None = None) -> ManagedServer:
    """s3rver on a free port with its built-in keys, state in a temp dir removed on stop."""
    raise_if_unavailable(s3rver_missing())
    return _with_port_retry(lambda: S3rverServer(start_timeout=timeout or START_TIMEOUT))
