"""A null S3 endpoint: it discards what is PUT and serves GETs from memory, to measure clients alone.

It is not a storage server. A PUT's body is read and dropped; only the object's size and its
``x-amz-meta-*`` headers are remembered. A GET answers ``payload(size)``, the same deterministic
bytes the benchmark uploads, so clients that check an end-to-end checksum still pass. It speaks
just enough S3 for the clients under test: PUT (single and multipart), GET (with Range), HEAD,
DELETE and ListObjectsV2 in pages of 1000, path-style or virtual-hosted (``bucket.localhost``),
and it ignores signatures. A bucket named ``listing-N`` lists N synthetic objects (nothing is
stored), to measure how a client lists a bucket of millions.

It runs in its own process (``NullEndpoint`` starts one) so that it never shares the client's
GIL: ``python -m kvstore.bench.null_endpoint`` prints its port and serves until killed.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import socket
import subprocess
import sys
import threading
import uuid
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

LABEL = "null endpoint (not a storage server)"
ACCESS_KEY = "null-access-key"
SECRET_KEY = "null-secret-key"
REGION = "us-east-1"
_ETAG = '"0123456789abcdef0123456789abcdef"'
_RECV_CHUNK = 1 << 20
_LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"


@functools.lru_cache(maxsize=8)
def payload(size: int) -> bytes:
    """The bytes the benchmark uploads and this endpoint serves for an object of ``size`` bytes."""
    return random.Random(size).randbytes(size)


class _State:
    """Objects (name -> size, metadata) and multipart uploads in progress; shared by all connections."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[tuple[str, str], tuple[int, list[tuple[str, str]]]] = {}
        self.uploads: dict[str, tuple[list[tuple[str, str]], dict[int, int]]] = {}  # id -> (metadata, part sizes)


class _Connection:
    """One keep-alive HTTP/1.1 connection, served on its own thread."""

    def __init__(self, sock: socket.socket, state: _State) -> None:
        self.sock = sock
        self.state = state
        self.pending = bytearray()
        self.scratch = memoryview(bytearray(_RECV_CHUNK))

    def serve(self) -> None:
        try:
            while self._one_request():
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            self.sock.close()

    def _read_head(self) -> bytes | None:
        while True:
            end = self.pending.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.pending[:end])
                del self.pending[: end + 4]
                return head
            n = self.sock.recv_into(self.scratch)
            if n == 0:
                return None
            self.pending += self.scratch[:n]

    def _read_body(self, length: int, keep: bool) -> bytes:
        """Read ``length`` body bytes; kept only when asked (XML bodies), otherwise dropped."""
        kept = bytearray() if keep else None
        take = min(length, len(self.pending))
        if kept is not None:
            kept += self.pending[:take]
        del self.pending[:take]
        length -= take
        while length > 0:
            n = self.sock.recv_into(self.scratch, min(length, _RECV_CHUNK))
            if n == 0:
                raise ConnectionError("body cut short")
            if kept is not None:
                kept += self.scratch[:n]
            length -= n
        return bytes(kept) if kept is not None else b""

    def _read_chunked(self, keep: bool) -> tuple[int, bytes]:
        total, kept = 0, bytearray()
        while True:
            while b"\r\n" not in self.pending:
                n = self.sock.recv_into(self.scratch)
                if n == 0:
                    raise ConnectionError("chunked body cut short")
                self.pending += self.scratch[:n]
            line_end = self.pending.find(b"\r\n")
            size = int(bytes(self.pending[:line_end]).split(b";")[0], 16)
            del self.pending[: line_end + 2]
            if size == 0:
                if not self.pending.startswith(b"\r\n"):
                    self._read_head()  # trailers, up to the blank line
                else:
                    del self.pending[:2]
                return total, bytes(kept)
            kept += self._read_body(size, keep)
            total += size
            self._read_body(2, False)

    def _one_request(self) -> bool:
        head = self._read_head()
        if head is None:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        want_body = method == "POST"
        if headers.get("expect", "").lower() == "100-continue":
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if headers.get("transfer-encoding", "").lower() == "chunked":
            size, body = self._read_chunked(want_body)
        else:
            size = int(headers.get("content-length", "0"))
            body = self._read_body(size, want_body)
        if "x-amz-decoded-content-length" in headers:
            size = int(headers["x-amz-decoded-content-length"])
        bucket, key, query = self._address(target, headers.get("host", ""))
        self._dispatch(method, bucket, key, query, headers, size, body)
        return headers.get("connection", "").lower() != "close"

    @staticmethod
    def _address(target: str, host: str) -> tuple[str, str, dict[str, list[str]]]:
        parts = urlsplit(target)
        path = unquote(parts.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        hostname = host.rsplit(":", 1)[0]
        if hostname.endswith(".localhost"):  # virtual-hosted: the bucket is in the Host name
            return hostname[: -len(".localhost")], path.lstrip("/"), query
        bucket, _, key = path.lstrip("/").partition("/")
        return bucket, key, query

    def _send(self, status: str, headers: list[tuple[str, str]], body: bytes | memoryview = b"", length: int | None = None) -> None:
        length = len(body) if length is None else length
        lines = [f"HTTP/1.1 {status}", f"Content-Length: {length}", "x-amz-request-id: null", *(f"{k}: {v}" for k, v in headers)]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if len(body) <= 65536:
            self.sock.sendall(head + bytes(body))
        else:
            self.sock.sendall(head)
            self.sock.sendall(body)

    def _error(self, status: str, code: str, head_only: bool = False) -> None:
        body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{code}</Message></Error>'.encode()
        if head_only:
            self._send(status, [("Content-Type", "application/xml")], b"", length=0)
        else:
            self._send(status, [("Content-Type", "application/xml")], body)

    def _dispatch(self, method: str, bucket: str, key: str, query: dict, headers: dict, size: int, body: bytes) -> None:
        state = self.state
        meta = [(k, v) for k, v in headers.items() if k.startswith("x-amz-meta-")]
        if method == "PUT" and key and "uploadId" in query:
            with state.lock:
                state.uploads[query["uploadId"][0]][1][int(query["partNumber"][0])] = size
            self._send("200 OK", [("ETag", _ETAG)])
        elif method == "PUT" and key:
            with state.lock:
                state.objects[(bucket, key)] = (size, meta)
            self._send("200 OK", [("ETag", _ETAG)])
        elif method == "POST" and key and "uploads" in query:
            upload_id = uuid.uuid4().hex
            with state.lock:
                state.uploads[upload_id] = (meta, {})
            xml = (f"<InitiateMultipartUploadResult><Bucket>{escape(bucket)}</Bucket><Key>{escape(key)}</Key>"
                   f"<UploadId>{upload_id}</UploadId></InitiateMultipartUploadResult>")
            self._send("200 OK", [("Content-Type", "application/xml")], xml.encode())
        elif method == "POST" and key and "uploadId" in query:
            with state.lock:
                meta, parts = state.uploads.pop(query["uploadId"][0], ([], {}))
                state.objects[(bucket, key)] = (sum(parts.values()), meta)
            xml = (f"<CompleteMultipartUploadResult><Bucket>{escape(bucket)}</Bucket><Key>{escape(key)}</Key>"
                   f"<ETag>{escape(_ETAG)}</ETag></CompleteMultipartUploadResult>")
            self._send("200 OK", [("Content-Type", "application/xml")], xml.encode())
        elif method == "DELETE" and key:
            with state.lock:
                state.objects.pop((bucket, key), None)
            self._send("204 No Content", [])
        elif method in ("GET", "HEAD") and key:
            self._get(method, bucket, key, headers)
        elif method == "GET" and query.get("list-type") == ["2"]:
            self._list(bucket, query)
        elif method in ("HEAD", "PUT", "GET"):  # bucket HEAD / create / location: every bucket exists
            self._send("200 OK", [("Content-Type", "application/xml")], b"" if method == "HEAD" else b"<LocationConstraint/>")
        else:
            self._error("501 Not Implemented", "NotImplemented")

    def _get(self, method: str, bucket: str, key: str, headers: dict) -> None:
        with self.state.lock:
            entry = self.state.objects.get((bucket, key))
        if entry is None:
            self._error("404 Not Found", "NoSuchKey", head_only=method == "HEAD")
            return
        size, meta = entry
        start, end, status = 0, size, "200 OK"
        extra = [("ETag", _ETAG), ("Last-Modified", _LAST_MODIFIED), ("Accept-Ranges", "bytes"),
                 ("Content-Type", "application/octet-stream"), *meta]
        spec = headers.get("range", "")
        if spec.startswith("bytes=") and size:
            first, _, last = spec[6:].partition("-")
            if first == "":  # suffix range: the last N bytes
                start, end = max(0, size - int(last)), size
            else:
                start = int(first)
                end = min(size, int(last) + 1) if last else size
            if start >= size:
                self._error("416 Requested Range Not Satisfiable", "InvalidRange", head_only=method == "HEAD")
                return
            status = "206 Partial Content"
            extra.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
        if method == "HEAD":
            self._send(status, extra, b"", length=end - start)
        else:
            self._send(status, extra, memoryview(payload(size))[start:end])

    def _list(self, bucket: str, query: dict) -> None:
        prefix = query.get("prefix", [""])[0]
        after = (query.get("continuation-token") or query.get("start-after") or [""])[0]
        limit = min(int(query.get("max-keys", ["1000"])[0]), 1000)
        synthetic = _synthetic(bucket)
        if synthetic is not None:
            found = synthetic.page(prefix, after, limit + 1)
        else:
            with self.state.lock:
                found = sorted((k, s) for (b, k), (s, _) in self.state.objects.items()
                               if b == bucket and k.startswith(prefix) and k > after)[: limit + 1]
        truncated, found = len(found) > limit, found[:limit]
        contents = "".join(
            f"<Contents><Key>{escape(k)}</Key><Size>{s}</Size><ETag>{escape(_ETAG)}</ETag>"
            f"<LastModified>2025-01-01T00:00:00.000Z</LastModified><StorageClass>STANDARD</StorageClass></Contents>"
            for k, s in found
        )
        more = f"<NextContinuationToken>{escape(found[-1][0])}</NextContinuationToken>" if truncated else ""
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>{escape(bucket)}</Name>'
               f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(found)}</KeyCount><MaxKeys>{limit}</MaxKeys>"
               f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>{more}{contents}</ListBucketResult>")
        self._send("200 OK", [("Content-Type", "application/xml")], xml.encode())


class _SyntheticListing:
    """``count`` objects that exist only in listings, named like LMCache chunks, in name order."""

    SIZE = 1 << 20

    def __init__(self, count: int) -> None:
        self.count = count

    @staticmethod
    def name(i: int) -> str:
        return f"model@1@0@{i:016x}@bfloat16"

    def page(self, prefix: str, after: str, limit: int) -> list[tuple[str, int]]:
        # The names sort as their index does, so the first one after the marker is a bisection away.
        lo, hi = 0, self.count
        while lo < hi:
            mid = (lo + hi) // 2
            if self.name(mid) <= after:
                lo = mid + 1
            else:
                hi = mid
        out = []
        for i in range(lo, min(self.count, lo + limit)):
            if self.name(i).startswith(prefix):
                out.append((self.name(i), self.SIZE))
        return out


def _synthetic(bucket: str) -> _SyntheticListing | None:
    """Bucket ``listing-N`` lists N synthetic objects (to measure a client on a huge listing); others are real."""
    stem, _, count = bucket.partition("listing-")
    return _SyntheticListing(int(count)) if not stem and count.isdigit() else None


def serve(port: int = 0) -> None:
    """Serve forever on 127.0.0.1:``port`` (and ::1, so that ``bucket.localhost`` names reach it too)."""
    state = _State()
    listeners = [socket.create_server(("127.0.0.1", port), backlog=256)]
    port = listeners[0].getsockname()[1]
    try:
        listeners.append(socket.create_server(("::1", port), family=socket.AF_INET6, backlog=256))
    except OSError:
        pass  # no IPv6 loopback: virtual-hosted names that resolve to ::1 will not reach us
    print(port, flush=True)
    for listener in listeners[1:]:
        threading.Thread(target=_accept, args=(listener, state), daemon=True).start()
    _accept(listeners[0], state)


def _accept(listener: socket.socket, state: _State) -> None:
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_Connection(sock, state).serve, daemon=True).start()


class NullEndpoint:
    """A null endpoint in a child process, with the same face as a test S3 server (``url``, ``extra_config``)."""

    name = "null"
    label = LABEL
    access_key = ACCESS_KEY
    secret_key = SECRET_KEY
    region = REGION

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "kvstore.bench.null_endpoint", "--exit-with-stdin"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        line = self._process.stdout.readline() if self._process.stdout else ""
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError("the null endpoint did not start")
        self.host = "127.0.0.1"
        self.port = int(line)
        self.endpoint = f"http://{self.host}:{self.port}"

    @property
    def pids(self) -> list[int]:
        return [self._process.pid] if self._process.poll() is None else []

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"s3://{bucket}/{prefix}".rstrip("/")

    def extra_config(self, **overrides: Any) -> dict[str, Any]:
        return self.config_for(self.endpoint) | overrides

    @staticmethod
    def config_for(endpoint: str) -> dict[str, Any]:
        """The extra_config that reaches a null endpoint listening at ``endpoint``."""
        return {"s3_endpoint_url": endpoint, "aws_access_key_id": ACCESS_KEY,
                "aws_secret_access_key": SECRET_KEY, "s3_region": REGION, "s3_addressing_style": "path"}

    def create_bucket(self, name: str) -> None:
        """Every bucket exists on the null endpoint."""

    def stop(self) -> None:
        if self._process.poll() is None:
            if self._process.stdin:
                self._process.stdin.close()
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> NullEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _exit_when_stdin_closes() -> None:
    sys.stdin.read()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvstore.bench.null_endpoint", description=LABEL)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--exit-with-stdin", action="store_true", help="exit when stdin closes (the parent is gone)")
    args = parser.parse_args(argv)
    if args.exit_with_stdin:
        threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()
    try:
        serve(args.port)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
