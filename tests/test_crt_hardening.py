"""The awscrt backend against server quirks, held answers and damaged uploads.

Quirks no local server shows on demand (a foreign XML namespace, an odd ``Content-Range``, a
listing that cannot continue) come from ``QuirkServer``, a small real HTTP server on loopback; the
rest runs against moto and SeaweedFS (which validates ``x-amz-checksum-crc32c``).
"""

from __future__ import annotations

import base64
import email.utils
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from kvstore_crt.backend import CANCEL_GRACE_S, CrtBackend

import kvstore
from kvstore.backends import call
from kvstore.config import resolve
from kvstore.errors import AuthError, BucketNotFound, KVStoreError, StoreTimeout, StoreUnavailable
from kvstore.testing.faults import FaultProxy

pytestmark = pytest.mark.servers

MiB = 1024 * 1024
FOREIGN_NS = "http://example.invalid/not-aws/"


# -- a loopback server with S3's quirks ----------------------------------------------------------
class QuirkServer:
    """Path-style S3 on 127.0.0.1 for one bucket, with quirks switched per test. Checks no signatures.

    ``range_answer`` says how a ranged GET of an empty object is answered ("206-odd", "206-bare",
    "200", "416"); ``list_pages`` replaces ListObjectsV2 answers (one body per request, in order);
    ``hold`` makes GETs of objects wait until it is set.
    """

    def __init__(self, bucket: str = "quirks") -> None:
        self.bucket = bucket
        self.objects: dict[str, bytes] = {}
        self.range_answer = "206-odd"
        self.list_pages: list[bytes] = []
        self.namespace = FOREIGN_NS
        self.hold: threading.Event | None = None
        self.requests: list[tuple[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if "Content-Length" not in (headers or {}):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, status: int, code: str) -> None:
                self._send(status, f'<?xml version="1.0"?><Error xmlns="{owner.namespace}"><Code>{code}</Code>'
                                   f"<Message>m</Message></Error>".encode(), {"Content-Type": "application/xml"})

            def _route(self) -> tuple[str | None, str, dict]:
                parts = urlsplit(self.path)
                bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
                owner.requests.append((self.command, self.path))
                return (bucket if bucket == owner.bucket else None), key, parse_qs(parts.query)

            def do_PUT(self) -> None:
                bucket, key, _ = self._route()
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if bucket is None:
                    return self._error(404, "NoSuchBucket")
                owner.objects[key] = body
                self._send(200, headers={"ETag": '"e"'})

            def do_HEAD(self) -> None:
                bucket, key, _ = self._route()
                if bucket is None or (key and key not in owner.objects):
                    return self._send(404)
                size = len(owner.objects[key]) if key else 0
                self._send(200, headers={"Content-Length": str(size), "ETag": '"e"',
                                         "Last-Modified": email.utils.formatdate(usegmt=True)})

            def do_GET(self) -> None:
                bucket, key, query = self._route()
                if bucket is None:
                    return self._error(404, "NoSuchBucket")
                if not key and "list-type" in query:
                    if owner.list_pages:
                        return self._send(200, owner.list_pages.pop(0), {"Content-Type": "application/xml"})
                    return self._send(200, list_page(owner.objects, owner.namespace))
                if key not in owner.objects:
                    return self._error(404, "NoSuchKey")
                if owner.hold is not None:
                    owner.hold.wait(30)
                data = owner.objects[key]
                headers = {"ETag": '"e"', "Last-Modified": email.utils.formatdate(usegmt=True)}
                ranged = self.headers.get("Range")
                if ranged and not data:
                    if owner.range_answer == "416":
                        return self._error(416, "InvalidRange")
                    if owner.range_answer == "206-odd":
                        return self._send(206, b"", {**headers, "Content-Range": "bytes 0--1/0"})
                    if owner.range_answer == "206-bare":
                        return self._send(206, b"", headers)
                    return self._send(200, b"", headers)
                if ranged:
                    start, _, end = ranged.split("=", 1)[1].partition("-")
                    first, last = int(start), min(int(end), len(data) - 1)
                    return self._send(206, data[first:last + 1],
                                      {**headers, "Content-Range": f"bytes {first}-{last}/{len(data)}"})
                self._send(200, data, headers)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> QuirkServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.hold is not None:
            self.hold.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def backend(self, bucket: str | None = None, **extra) -> CrtBackend:
        config = {"s3_endpoint_url": f"http://127.0.0.1:{self.port}", "aws_access_key_id": "AK",
                  "aws_secret_access_key": "SK", "s3_region": "us-east-1", "s3_addressing_style": "path",
                  "kvstore_backend": "crt", **extra}
        return CrtBackend(resolve(f"s3://{bucket or self.bucket}", config))


def list_page(objects: dict[str, bytes], namespace: str, *, truncated: str = "false",
              token: str | None = None) -> bytes:
    """A ListObjectsV2 page in ``namespace``, its elements in an order AWS does not use."""
    contents = "".join(f"<Contents><Size>{len(v)}</Size><ETag>\"e\"</ETag><Key>{k}</Key>"
                       f"<LastModified>2024-01-01T00:00:00.000Z</LastModified></Contents>" for k, v in objects.items())
    next_token = f"<NextContinuationToken>{token}</NextContinuationToken>" if token else ""
    return (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{namespace}">{contents}'
            f"<IsTruncated>{truncated}</IsTruncated>{next_token}<Name>quirks</Name></ListBucketResult>").encode()


@pytest.fixture
def quirks():
    with QuirkServer() as server:
        yield server


# -- a relay that damages uploads ----------------------------------------------------------------
class UploadTap:
    """A loopback HTTP/1.1 relay in front of ``upstream_port`` that records request heads and can
    flip one byte in the body of the next ``damage`` PUT requests (the network corrupting an upload).

    It answers ``Expect: 100-continue`` itself and relays one exchange at a time per connection.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.damage = 0
        self.damaged = 0
        self.heads: list[bytes] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        for sock in list(self._sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        self._sockets.append(upstream)
        down, up = client.makefile("rb"), upstream.makefile("rb")
        try:
            while True:
                head = _read_head(down)
                if not head:
                    return
                lines = head.split(b"\r\n")
                if _get(lines, b"expect"):
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    lines = [line for line in lines if not line.lower().startswith(b"expect:")]
                body = _read_body(down, lines)
                with self._lock:
                    self.heads.append(b"\r\n".join(lines))
                    if lines[0].startswith(b"PUT ") and self.damage and body:
                        self.damage -= 1
                        self.damaged += 1
                        body = bytearray(body)
                        body[len(body) // 2] ^= 0x01
                upstream.sendall(b"\r\n".join(lines) + bytes(body))
                response = _read_head(up)
                rlines = response.split(b"\r\n")
                status = int(rlines[0].split()[1])
                no_body = lines[0].startswith(b"HEAD ") or status in (204, 304)
                client.sendall(response + (b"" if no_body else bytes(_read_body(up, rlines))))
        except (OSError, ValueError, IndexError):
            return
        finally:
            client.close()
            upstream.close()


def _read_head(stream) -> bytes:
    lines = []
    while True:
        line = stream.readline()
        if not line:
            return b""
        lines.append(line)
        if line == b"\r\n":
            return b"".join(lines)


def _get(lines: list[bytes], name: bytes) -> bytes | None:
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _read_body(stream, lines: list[bytes]) -> bytearray:
    """The body as sent (a chunked one verbatim, size lines and trailers included)."""
    if (_get(lines, b"transfer-encoding") or b"").lower() == b"chunked":
        out = bytearray()
        while True:
            size_line = stream.readline()
            out += size_line
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while True:
                    trailer = stream.readline()
                    out += trailer
                    if trailer in (b"\r\n", b""):
                        return out
            out += stream.read(size + 2)
    return bytearray(stream.read(int(_get(lines, b"content-length") or b"0")))


# -- fixtures on real servers --------------------------------------------------------------------
@pytest.fixture(scope="module")
def moto(s3_servers):
    return s3_servers.get("moto")


@pytest.fixture(scope="module")
def bucket(moto):
    name = f"crth-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(name)
    return name


def raw(server, bucket: str, endpoint: str | None = None, **overrides) -> CrtBackend:
    extra = server.extra_config(kvstore_backend="crt", **overrides)
    if endpoint:
        extra["s3_endpoint_url"] = endpoint
    return CrtBackend(resolve(f"s3://{bucket}", extra))


def b64_crc32c(data: bytes) -> str:
    from awscrt.checksums import crc32c

    return base64.b64encode(crc32c(data).to_bytes(4, "big")).decode()


# -- 12 §3: a miss is a miss only when the bucket is there ---------------------------------------
def test_missing_bucket_is_loud_for_every_read(moto):
    import asyncio

    with kvstore.open("s3://no-such-bucket-crth/p", moto.extra_config(kvstore_backend="crt")) as s:
        for read in (lambda: s.get("k"), lambda: s.get_into("k", bytearray(4)), lambda: s.exists("k"),
                     lambda: s.stat("k"), lambda: s.exists_many(["a", "b"]), lambda: s.delete("k"),
                     lambda: asyncio.run(s.aexists("k")), lambda: asyncio.run(s.aget_into("k", bytearray(4)))):
            with pytest.raises(BucketNotFound) as info:
                read()
            assert info.value.__cause__ is not None, "the client's error is kept as the cause"


def test_wrong_secret_is_an_auth_error_for_every_read(moto, bucket):
    with kvstore.open(f"s3://{bucket}/p", moto.extra_config(kvstore_backend="crt",
                                                            aws_secret_access_key="wrong-secret")) as s:
        for read in (lambda: s.get("k"), lambda: s.get_into("k", bytearray(4)), lambda: s.exists("k"),
                     lambda: s.stat("k"), lambda: s.exists_many(["a", "b"])):
            with pytest.raises(AuthError) as info:
                read()
            assert "wrong-secret" not in str(info.value)
            assert info.value.__cause__ is not None


def test_a_miss_costs_one_request_and_the_bucket_probe_is_cached(moto, bucket):
    with FaultProxy(moto.port) as proxy:
        backend = raw(moto, bucket, proxy.endpoint)
        try:
            for i in range(5):
                assert backend.head(f"absent-{i}") is None
            assert proxy.responses == 5 + 1, "one HeadBucket for the first miss, none after"
            assert backend.get_into("absent", memoryview(bytearray(4))) is None  # NoSuchKey: no probe
            assert proxy.responses == 7
        finally:
            backend.close()


# -- 12 §4: unfamiliar servers ---------------------------------------------------------------------
def test_listing_in_a_foreign_namespace_is_read(quirks):
    quirks.objects.update({"a/1": b"x", "a/2": b"yy"})
    quirks.list_pages = [list_page({"a/1": b"x"}, FOREIGN_NS, truncated="true", token="t1"),
                         list_page({"a/2": b"yy"}, "")]
    backend = quirks.backend()
    try:
        assert [(i.key, i.size, i.etag) for i in backend.list("a/")] == [("a/1", 1, "e"), ("a/2", 2, "e")]
        assert [i.key for i in backend.list("a/")] == ["a/1", "a/2"]  # the server's own page, foreign namespace
    finally:
        backend.close()


BAD_PAGES = {
    "truncated without a token": list_page({"a": b"x"}, FOREIGN_NS, truncated="true"),
    "no IsTruncated": b'<ListBucketResult xmlns="x"><Contents><Key>a</Key><Size>1</Size></Contents></ListBucketResult>',
    "unreadable": b"<ListBucketResult><Contents><Key>a</Key>",
    "another document": b"<ListAllMyBucketsResult><Buckets/></ListAllMyBucketsResult>",
    "entry without a size": b"<ListBucketResult><Contents><Key>a</Key></Contents><IsTruncated>false</IsTruncated>"
                            b"</ListBucketResult>",
}


@pytest.mark.parametrize("case", list(BAD_PAGES))
def test_a_listing_that_cannot_be_completed_is_an_error(quirks, case):
    quirks.list_pages = [BAD_PAGES[case]]
    backend = quirks.backend()
    try:
        with pytest.raises(StoreUnavailable) as info:
            list(backend.list(""))
        assert not info.value.retryable
    finally:
        backend.close()


def test_a_repeated_continuation_token_is_an_error(quirks):
    page = list_page({"a": b"x"}, FOREIGN_NS, truncated="true", token="same")
    quirks.list_pages = [page, page]
    backend = quirks.backend()
    try:
        with pytest.raises(StoreUnavailable, match="repeated"):
            list(backend.list(""))
    finally:
        backend.close()


@pytest.mark.parametrize("answer", ["206-odd", "206-bare", "200", "416"])
def test_the_empty_object_reads_as_empty_whatever_the_range_answer(quirks, answer):
    quirks.objects["empty"] = b""
    quirks.range_answer = answer
    backend = quirks.backend()
    try:
        data, result = backend.get("empty")
        assert bytes(data) == b"" and result.size == 0
        assert backend.get_into("empty", memoryview(bytearray(4))).size == 0
    finally:
        backend.close()


def test_error_codes_are_read_whatever_the_namespace():
    from kvstore.backends.s3errors import error_code

    assert error_code(f'<Error xmlns="{FOREIGN_NS}"><Message>m</Message><Code>NoSuchBucket</Code></Error>') \
        == "NoSuchBucket"
    assert error_code(b'<s3:Error xmlns:s3="u"><s3:Code>SlowDown</s3:Code></s3:Error>') == "SlowDown"
    assert error_code(b"<Error><Code>Access") is None


def test_tls_against_a_plain_http_endpoint_says_so(moto, bucket):
    backend = raw(moto, bucket, f"https://127.0.0.1:{moto.port}", kvstore_timeout_s=5)
    try:
        hint = "the endpoint may not speak TLS: use http:// or disable_tls"
        with pytest.raises(StoreUnavailable, match=hint) as info:
            backend.head("k")
        assert not info.value.retryable and info.value.__cause__ is not None
    finally:
        backend.close()


# -- 13 §1 and §2: cancellation and deadlines ------------------------------------------------------
def test_a_revoked_read_never_writes_the_buffer(moto, bucket):
    store_backend = raw(moto, bucket)
    store_backend.put("held", memoryview(b"\x07" * 300_000), {})
    store_backend.close()
    with FaultProxy(moto.port) as proxy:
        backend = raw(moto, bucket, proxy.endpoint, kvstore_timeout_s=20)
        buffer = bytearray(300_000)
        lease = call.BufferLease()
        outcome: list[object] = []

        def read() -> None:
            with call.running(call.Call(20, lease)):
                try:
                    outcome.append(backend.get_into("held", memoryview(buffer)))
                except Exception as exc:
                    outcome.append(exc)

        proxy.delay(1.5, count=1)
        thread = threading.Thread(target=read)
        thread.start()
        time.sleep(0.5)  # the GET has gone out; its answer is held
        lease.revoke("cancelled by the test")
        thread.join(CANCEL_GRACE_S + 1)
        assert not thread.is_alive(), "a revoke cancels the request"
        time.sleep(1.5)  # the held answer is released meanwhile
        try:
            assert buffer == bytearray(300_000), "nothing lands after the revoke returned"
            assert len(outcome) == 1 and isinstance(outcome[0], KVStoreError), outcome
        finally:
            backend.close()


@pytest.mark.parametrize("how", ["wait_for", "close"])
def test_a_timed_out_or_closed_aget_into_never_writes_afterwards(moto, bucket, how):
    """The same through KVStore: wait_for's timeout (or close()) returns, the held answer arrives later."""
    import asyncio

    size = 300_000
    with kvstore.open(f"s3://{bucket}/held", moto.extra_config(kvstore_backend="crt")) as s:
        s.put("A", b"\x0a" * size)
    with FaultProxy(moto.port) as proxy:
        s = kvstore.open(f"s3://{bucket}/held", moto.extra_config(kvstore_backend="crt", s3_endpoint_url=proxy.endpoint,
                                                                   kvstore_timeout_s=20))
        buffer = bytearray(size)
        proxy.delay(1.5, count=1)

        async def main() -> None:
            task = asyncio.ensure_future(s.aget_into("A", buffer))
            if how == "wait_for":
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(task, 0.5)
            else:
                await asyncio.sleep(0.5)
                await asyncio.get_running_loop().run_in_executor(None, s.close)
                with pytest.raises(KVStoreError):
                    await task

        try:
            asyncio.run(main())
            time.sleep(2.0)  # the held answer has been released meanwhile
            assert buffer == bytearray(size)
        finally:
            s.close()


def test_each_request_gets_what_is_left_of_the_deadline(moto, bucket):
    with FaultProxy(moto.port) as proxy:
        backend = raw(moto, bucket, proxy.endpoint, kvstore_timeout_s=30)
        try:
            proxy.delay(3, count=1)
            start = time.monotonic()
            with call.running(call.Call(1.0)), pytest.raises(StoreTimeout):
                backend.head("slow")
            assert time.monotonic() - start < 1.0 + CANCEL_GRACE_S
            with call.running(call.Call(0.0)), pytest.raises(StoreTimeout):
                backend.head("spent")  # nothing left: no request at all
        finally:
            backend.close()


# -- 13 §3: the server verifies what we upload -----------------------------------------------------
def test_uploads_carry_the_s3_checksum_header(moto, bucket):
    tap = UploadTap(moto.port)
    backend = raw(moto, bucket, tap.endpoint)
    try:
        small = b"s" * 1000
        big = bytes(range(256)) * (17 * MiB // 256)  # three parts at 8 MiB
        backend.put("small", memoryview(small), {})
        backend.put("big", memoryview(big), {})
        heads = [h.decode("latin-1").lower() for h in tap.heads]
        single = next(h for h in heads if h.startswith(f"put /{bucket}/small "))
        assert f"x-amz-checksum-crc32c: {b64_crc32c(small)}".lower() in single
        create = next(h for h in heads if h.startswith(f"post /{bucket}/big?uploads"))
        assert "x-amz-checksum-algorithm: crc32c" in create
        parts = [h for h in heads if h.startswith(f"put /{bucket}/big?partnumber=")]
        assert len(parts) == 3 and all("x-amz-checksum-crc32c:" in h for h in parts)
        part1 = next(h for h in parts if "partnumber=1&" in h)
        assert f"x-amz-checksum-crc32c: {b64_crc32c(big[:8 * MiB])}".lower() in part1
    finally:
        backend.close()
        tap.close()


@pytest.fixture(scope="module")
def seaweed(s3_servers):
    return s3_servers.get("seaweedfs")


@pytest.mark.parametrize("size", [100_000, 17 * MiB])
def test_an_upload_damaged_on_the_way_is_refused_and_resent(seaweed, size):
    name = f"crth-{uuid.uuid4().hex[:12]}"
    seaweed.create_bucket(name)
    data = bytes(range(251)) * (size // 251 + 1)
    data = data[:size]
    tap = UploadTap(seaweed.port)
    try:
        backend = raw(seaweed, name, tap.endpoint)
        tap.damage = 1
        with pytest.raises(StoreUnavailable) as info:
            backend.put("damaged", memoryview(data), {})
        assert info.value.retryable and info.value.status == 400 and tap.damaged == 1
        backend.close()
        extra = seaweed.extra_config(kvstore_backend="crt", s3_endpoint_url=tap.endpoint)
        with kvstore.open(f"s3://{name}/p", extra) as s:
            tap.damage = 1
            s.put("resent", data)
            assert tap.damaged == 2
            assert s.get("resent") == data
    finally:
        tap.close()
