"""Loopback ports and name resolution for the test servers: free ports (also free on ``[::1]``), the
``*.localhost`` probe for virtual-hosted addressing, and plain TCP/HTTP probes."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

__all__ = ["DEFAULT_REGION", "LOOPBACK", "free_port", "free_ports", "port_is_free", "virtual_hosting_works"]

LOOPBACK = "127.0.0.1"
DEFAULT_REGION = "us-east-1"


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


def _tcp_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _http_status(url: str, *, method: str = "GET", data: bytes | None = None, timeout: float = 5.0) -> int:
    """HTTP status of a plain (unsigned) request; raises OSError when nothing answers."""
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "text/plain"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code

