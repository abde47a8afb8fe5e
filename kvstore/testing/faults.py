"""A fault-injecting HTTP/1.1 proxy on loopback, in front of a real S3 server, for reliability tests.

It relays requests and responses one at a time (keep-alive kept), so a fault applies to whole
responses: pass through, answer 500/503 itself, delay the response, drop the connection after
N body bytes, flip body bytes (of responses, or of request bodies on their way to the server),
reset new connections, or refuse connections as a dead server does. To show what a silent
server does it can also stall (take the request, withhold ``100 Continue``, never answer),
trickle a body one byte at a time, or hold a response mid-body until ``release()``. Faults
switch at runtime and last for ``count`` responses or ``seconds``, or until ``clear()``.
Connections are bounded; ``stop()`` closes every socket it opened.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

MAX_CONNECTIONS = 128
_BUFSIZE = 256 * 1024
_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
_INTERNAL = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
             b"<Message>We encountered an internal error. Please try again.</Message></Error>")


@dataclass
class Fault:
    kind: str  # "error", "delay", "drop", "lose", "corrupt", "corrupt-request", "stall", "trickle", "hold", "reset", "refuse"
    status: int = 503
    seconds: float = 0.0
    after_bytes: int = 0
    remaining: int | None = None  # responses still to spoil; None: no count
    until: float | None = None  # monotonic end; None: until cleared
    wait_s: float = 0.0  # "error": how long to take before answering
    method: bytes | None = None  # "lose", "hold": only requests of this method (None: any)


class _Closed(Exception):
    """The peer closed its side."""


class FaultProxy:
    """Listens on 127.0.0.1 (``port``) and forwards to ``upstream_port``, spoiling responses on demand."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.responses = 0  # responses relayed or made up
        self.faults_applied = 0
        self._fault: Fault | None = None
        self._queue: list[Fault] = []  # faults that follow when the current one is used up
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self._released = threading.Event()  # ends a stall or a hold
        self.holding = threading.Event()  # set while a response is stalled or held
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self.port = 0

    def __repr__(self) -> str:
        return f"FaultProxy(port={self.port}, upstream={self.upstream[1]}, fault={self._fault})"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._listen()
        return self

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, args=(listener,), name="fault-proxy", daemon=True)
        self._accept_thread.start()

    def _unlisten(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(2)

    def stop(self) -> None:
        self._stopping.set()
        self._unlisten()
        self._released.set()
        with self._lock:
            open_sockets, threads = list(self._sockets), list(self._threads)
        for sock in open_sockets:
            _close(sock)
        for thread in threads:
            thread.join(2)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def open_sockets(self) -> int:
        with self._lock:
            return len(self._sockets)

    # -- switching faults -----------------------------------------------------------------
    def set(self, fault: Fault | None, *then: Fault) -> None:
        """Apply ``fault`` now and each of ``then`` in turn as the one before is used up (by ``count``)."""
        with self._lock:
            self._fault, self._queue = fault, list(then)
            if fault is not None and fault.kind in ("stall", "hold"):
                self._released.clear()
                self.holding.clear()
            else:
                self._released.set()  # switching faults lets go of a held response
        if fault is not None and fault.kind == "refuse":
            self._unlisten()
            self.drop_connections()
        elif self._listener is None and not self._stopping.is_set():
            self._listen()

    def clear(self) -> None:
        """Back to pass-through (and listening again after ``refuse``)."""
        self.set(None)

    def error(self, status: int = 503, *, count: int | None = None, seconds: float | None = None,
              wait_s: float = 0.0) -> None:
        """Answer ``status`` (503 SlowDown or 500 InternalError XML), after ``wait_s``, without asking the server."""
        self.set(Fault("error", status=status, remaining=count, until=_until(seconds), wait_s=wait_s))

    def delay(self, seconds: float, *, count: int | None = None) -> None:
        """Hold each response ``seconds`` before relaying it."""
        self.set(Fault("delay", seconds=seconds, remaining=count))

    def drop(self, after_bytes: int, *, count: int | None = None) -> None:
        """Close the connection after ``after_bytes`` bytes of a response body."""
        self.set(Fault("drop", after_bytes=after_bytes, remaining=count))

    def lose(self, *, method: str | None = None, count: int | None = 1) -> None:
        """Let the request reach the server, then cut the connection instead of relaying its answer.

        What a client sees when a response is lost on the way: the server did the work (stored
        the object), the client cannot know it. ``method`` limits it to one kind of request.
        """
        self.set(Fault("lose", remaining=count, method=method.upper().encode() if method else None))

    def corrupt(self, *, count: int | None = None) -> None:
        """Flip one byte in the middle of each response body (headers untouched)."""
        self.set(Fault("corrupt", remaining=count))

    def corrupt_request(self, *, count: int | None = None) -> None:
        """Flip one byte in the middle of each request body on its way to the server (PUT, UploadPart)."""
        self.set(Fault("corrupt-request", remaining=count))

    def stall(self, *, count: int | None = None) -> None:
        """Take each request and never answer (no ``100 Continue`` either) until ``release()``, then cut it."""
        self.set(Fault("stall", remaining=count))

    def trickle(self, seconds: float, *, count: int | None = None) -> None:
        """Relay each response body one byte every ``seconds``."""
        self.set(Fault("trickle", seconds=seconds, remaining=count))

    def hold(self, after_bytes: int = 0, *, count: int | None = 1, method: str | None = None) -> None:
        """Relay a response's head and ``after_bytes`` body bytes, then hold the rest until ``release()``.

        ``method`` limits it to one kind of request (``"GET"``: a HEAD before it goes through).
        """
        self.set(Fault("hold", after_bytes=after_bytes, remaining=count, method=method.upper().encode() if method else None))

    def release(self) -> None:
        """Let a stalled or held response go on."""
        self._released.set()

    def _wait_released(self) -> None:
        self.holding.set()
        while not self._released.wait(0.05) and not self._stopping.is_set():
            pass

    def reset(self, *, count: int | None = None, seconds: float | None = None) -> None:
        """Accept new connections and reset them at once (RST)."""
        self.set(Fault("reset", remaining=count, until=_until(seconds)))

    def refuse(self) -> None:
        """Stop listening and cut open connections: the server looks dead until ``clear()``."""
        self.set(Fault("refuse"))

    def drop_connections(self) -> None:
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            _close(sock)

    def _take(self, kinds: tuple[str, ...], method: bytes = b"") -> Fault | None:
        """The active fault if it is one of ``kinds`` (and applies to ``method``), counting it as used."""
        with self._lock:
            fault = self._fault
            if fault is None or fault.kind not in kinds or (fault.method is not None and fault.method != method):
                return None
            if fault.until is not None and time.monotonic() >= fault.until:
                self._fault = None
                return None
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._fault = self._queue.pop(0) if self._queue else None
                    if self._fault is not None and self._fault.kind in ("stall", "hold"):
                        self._released.clear()
            self.faults_applied += 1
            return fault

    # -- relaying -------------------------------------------------------------------------
    def _accept_loop(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._take(("reset",)) is not None:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            if not self._slots.acquire(blocking=False):
                client.close()
                continue
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            with self._lock:
                self._sockets.add(client)
                self._threads.add(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        client_in = _Reader(client)
        try:
            while not self._stopping.is_set():
                head = client_in.head()
                method = head.split(b" ", 1)[0].upper()
                expects_continue = (_header(head, b"expect") or b"").lower() == b"100-continue"
                error = self._take(("error",))
                if error is not None:
                    if error.wait_s:
                        self._stopping.wait(error.wait_s)
                    body = _SLOWDOWN if error.status == 503 else _INTERNAL
                    # A client waiting for "100 Continue" sends no body: answer and close instead of draining.
                    if not expects_continue:
                        _relay_body(client_in, head, None)
                    self._count()  # before the client can hear it, so a count read after its call returns is whole
                    client.sendall(b"HTTP/1.1 %d Error\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n%s\r\n%s"
                                   % (error.status, len(body), b"Connection: close\r\n" if expects_continue else b"",
                                      b"" if method == b"HEAD" else body))
                    if expects_continue:
                        return
                    continue
                if self._take(("stall",)) is not None:
                    self._wait_released()
                    return  # cut, as a server that never answered and then went away
                if expects_continue:  # answered here, so the server's own 100 never has to be relayed
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = b"\r\n".join(line for line in head.split(b"\r\n")
                                         if not line.lower().startswith(b"expect:"))
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=30)
                    with self._lock:
                        self._sockets.add(upstream)
                    upstream_in = _Reader(upstream)
                upstream.sendall(head)
                has_body = int(_header(head, b"content-length") or 0) > 0
                _relay_body(client_in, head, upstream, spoil=self._take(("corrupt-request",)) if has_body else None)
                response = upstream_in.head()
                if self._take(("lose",), method) is not None:
                    return  # the server has answered; the client never hears it
                delay = self._take(("delay",))
                if delay is not None:
                    self._stopping.wait(delay.seconds)
                spoil = self._take(("drop", "corrupt", "trickle", "hold"), method)
                if spoil is None:  # counted before the client can have it all (it may return at once)
                    self._count()
                client.sendall(response)
                if not _relay_body(upstream_in, response, client, method=method, spoil=spoil, proxy=self):
                    return
                if spoil is not None:
                    self._count()
        except (_Closed, OSError):
            pass
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    _close(sock)
                    with self._lock:
                        self._sockets.discard(sock)
            with self._lock:
                self._threads.discard(threading.current_thread())
            self._slots.release()

    def _count(self) -> None:
        with self._lock:
            self.responses += 1


def _until(seconds: float | None) -> float | None:
    return None if seconds is None else time.monotonic() + seconds


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class _Reader:
    """Buffered reads from a socket: a message head, exact byte counts, lines."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        data = self.sock.recv(_BUFSIZE)
        if not data:
            raise _Closed()
        self.buffer += data

    def head(self) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > 64 * 1024:
                raise _Closed()
            self._fill()
        end = self.buffer.index(b"\r\n\r\n") + 4
        head, self.buffer = self.buffer[:end], self.buffer[end:]
        return head

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        end = self.buffer.index(b"\r\n") + 2
        line, self.buffer = self.buffer[:end], self.buffer[end:]
        return line

    def chunks(self, n: int | None) -> Iterator[bytes]:
        """``n`` bytes (until the peer closes when None), as they arrive."""
        while n is None or n > 0:
            if not self.buffer:
                try:
                    self._fill()
                except _Closed:
                    if n is None:
                        return
                    raise
            piece = self.buffer if n is None else self.buffer[:n]
            self.buffer = self.buffer[len(piece):]
            if n is not None:
                n -= len(piece)
            yield piece


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _relay_body(source: _Reader, head: bytes, sink: socket.socket | None, *, method: bytes = b"",
                spoil: Fault | None = None, proxy: FaultProxy | None = None) -> bool:
    """Copy the body that follows ``head`` to ``sink`` (None: discard). False when a fault cut it."""
    is_response = head.startswith(b"HTTP/")
    status = int(head.split(b" ", 2)[1]) if is_response else 0
    if is_response and (method == b"HEAD" or status in (204, 304) or 100 <= status < 200):
        return True
    length = _header(head, b"content-length")
    if (_header(head, b"transfer-encoding") or b"").lower() == b"chunked":
        pieces = _chunked(source)
        length_known = None
    elif length is not None:
        length_known = int(length)
        pieces = source.chunks(length_known)
    elif is_response:
        length_known = None
        pieces = source.chunks(None)
    else:
        return True
    sent = 0
    kind = spoil.kind if spoil is not None else None
    after_bytes, seconds = (spoil.after_bytes, spoil.seconds) if spoil is not None else (0, 0.0)  # used only with a kind
    for piece in pieces:
        if kind == "drop" and sent + len(piece) >= after_bytes:
            if sink is not None:
                sink.sendall(piece[: max(0, after_bytes - sent)])
            return False
        if kind == "hold" and sent + len(piece) >= after_bytes and proxy is not None and sink is not None:
            sink.sendall(piece[: max(0, after_bytes - sent)])
            proxy._wait_released()
            piece, sent, kind = piece[max(0, after_bytes - sent):], after_bytes, None
        if kind == "trickle" and sink is not None and proxy is not None:
            for i in range(len(piece)):
                if proxy._stopping.wait(seconds):
                    return False
                sink.sendall(piece[i:i + 1])
            sent += len(piece)
            continue
        if kind in ("corrupt", "corrupt-request") and length_known:
            middle = length_known // 2
            if sent <= middle < sent + len(piece):
                spoilt = bytearray(piece)
                spoilt[middle - sent] ^= 0xFF
                piece = bytes(spoilt)
        if sink is not None:
            sink.sendall(piece)
        sent += len(piece)
    return True


def _chunked(source: _Reader) -> Iterator[bytes]:
    """A chunked body, relayed verbatim (size lines and trailers included)."""
    while True:
        size_line = source.line()
        yield size_line
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            while True:
                trailer = source.line()
                yield trailer
                if trailer == b"\r\n":
                    return
        yield from source.chunks(size + 2)
