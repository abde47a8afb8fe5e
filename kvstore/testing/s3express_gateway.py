"""A loopback S3 Express zonal endpoint FOR TESTS: CreateSession and session auth in front of a plain S3 server.

No local S3 server implements S3 Express, so this gateway plays the zonal endpoint the way AWS
documents it, and forwards the data requests to a real S3 server (moto) behind it:

* ``GET /?session`` on the bucket (virtual-hosted ``BUCKET.localhost:PORT`` or path-style
  ``/BUCKET?session``; a bare ``/?session`` on ``127.0.0.1`` means the gateway's bucket), SigV4
  signed with the long-term keys, answers ``<CreateSessionResult><Credentials>`` with a fresh
  session key pair, token and ``Expiration`` (``session_ttl_s`` from now: short in tests, so that
  refreshes can be observed).
* Every other request must carry ``x-amz-s3session-token`` of a live session and a SigV4
  signature made with that session's secret; the signature is verified in full (canonical
  request, signed headers, scope), then the request is re-signed with the upstream server's keys
  and forwarded path-style, bodies streamed both ways.

``sessions_created``, ``requests_served`` and ``rejected`` let tests assert "one session,
reused, refreshed when it expires".

Three ways in. Clients that take an endpoint (the CRT) talk plain HTTP to ``endpoint``, or, given
a ``ThrowawayCA``, HTTPS to ``tls_endpoint`` (``https://localhost:PORT``, virtual-hosted as
``BUCKET.localhost``, with a certificate the CA signed). Clients that insist on AWS's own zonal host (obstore derives ``BUCKET.s3express-AZ.REGION.amazonaws.com``
itself and ignores any endpoint for CreateSession) use the gateway as their HTTPS proxy
(``proxy_url``): given a ``ThrowawayCA``, it accepts ``CONNECT`` to the zonal hosts of its zone
(``*.s3express-AZ.REGION.amazonaws.com:443``) and answers inside the tunnel with a certificate the
CA signed (``ca_file``, for ``s3_ca_bundle``). Nothing leaves the machine: every other
``CONNECT`` target is refused. As on AWS, CreateSession for a bucket that does not exist answers
404 NoSuchBucket.

Running the same tests against a real directory bucket: see the "S3 Express" section of
docs/reliability.md (``KVSTORE_S3EXPRESS_URL=s3://NAME--AZID--x-s3/prefix`` with AWS credentials).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import http.client
import secrets
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kvstore.config.profiles import express_zone, s3express_host
from kvstore.testing.tls import ThrowawayCA

CHUNK = 1 << 20
# Headers that describe one hop, never forwarded.
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host",
        "authorization", "x-amz-s3session-token", "x-amz-security-token", "x-amz-date", "expect"}


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="-_.~")


def canonical_query(raw_query: str) -> str:
    """SigV4's canonical query string: each name and value percent-encoded once, sorted."""
    pairs = []
    for part in raw_query.split("&") if raw_query else []:
        name, _, value = part.partition("=")
        pairs.append((_quote(urllib.parse.unquote(name)), _quote(urllib.parse.unquote(value))))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def signature(secret: str, amz_date: str, scope: str, method: str, path: str, raw_query: str,
              headers: dict[str, str], signed: list[str], payload_hash: str) -> str:
    """The SigV4 signature of a request (S3 flavour: the path is used as sent, not re-encoded)."""
    canonical_headers = "".join(f"{h}:{' '.join(headers.get(h, '').split())}\n" for h in signed)
    canonical = "\n".join([method, path or "/", canonical_query(raw_query), canonical_headers, ";".join(signed),
                           payload_hash])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    date, region, service, _ = scope.split("/")
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + secret).encode(), date), region), service), "aws4_request")
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Session:
    access_key: str
    secret_key: str
    token: str
    bucket: str
    expires: float  # seconds since the epoch


class AuthFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class S3ExpressGateway:
    """The test stand-in for a zonal endpoint (see the module docstring). Start with ``with`` or ``start()``."""

    def __init__(self, upstream: str, access_key: str, secret_key: str, *, bucket: str, region: str = "us-east-1",
                 upstream_access_key: str | None = None, upstream_secret_key: str | None = None,
                 session_ttl_s: float = 300.0, ca: ThrowawayCA | None = None) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.access_key, self._secret_key = access_key, secret_key
        self._upstream_keys = (upstream_access_key or access_key, upstream_secret_key or secret_key)
        self.bucket, self.region, self.session_ttl_s = bucket, region, session_ttl_s
        self.sessions_created = 0
        self.requests_served = 0
        self.rejected: list[str] = []  # error codes of refused requests, in order
        self.credentials_expired = False  # set to answer CreateSession with ExpiredToken (long-term keys ran out)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        zone = express_zone(bucket)
        self.zonal_domain = s3express_host(zone, region) if zone else None  # BUCKET.<this> is a zonal host
        if ca and not self.zonal_domain:
            raise ValueError(f"a zonal host needs a directory bucket name (NAME--AZID--x-s3), got {bucket!r}")
        self.ca_file = ca.ca_file if ca else None
        self._zonal_tls = ca.server_context(f"*.{self.zonal_domain}") if ca else None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._tls_server: ThreadingHTTPServer | None = None
        if ca:
            self._tls_server = _TlsServer(("127.0.0.1", 0), _handler_for(self),
                                          ca.server_context(f"{bucket}.localhost", "*.localhost", "localhost"))
        self._threads: list[threading.Thread] = []

    def __repr__(self) -> str:
        return f"S3ExpressGateway(port={self.port}, bucket={self.bucket!r}, sessions={self.sessions_created})"

    @property
    def endpoint(self) -> str:
        """Plain-HTTP endpoint for clients that take one."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def tls_endpoint(self) -> str:
        """HTTPS endpoint (needs ``ca``); ``BUCKET.localhost`` must resolve to loopback for virtual hosting."""
        if self._tls_server is None:
            raise RuntimeError("the gateway serves HTTPS only when given a ca")
        return f"https://localhost:{self._tls_server.server_address[1]}"

    @property
    def proxy_url(self) -> str:
        """HTTPS proxy for clients that go to the AWS zonal host (needs ``ca``)."""
        return f"http://127.0.0.1:{self.port}"

    def _servers(self) -> list[ThreadingHTTPServer]:
        return [self._server] + ([self._tls_server] if self._tls_server else [])

    def start(self) -> S3ExpressGateway:
        for server in self._servers():
            thread = threading.Thread(target=server.serve_forever, name="s3express-gateway", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers():
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> S3ExpressGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def bucket_exists(self, bucket: str) -> bool:
        return self._upstream("HEAD", f"/{bucket}")[0] != 404

    def create_bucket(self) -> None:
        """Create the gateway's bucket upstream (SDKs such as boto3 would send CreateSession for a ``--x-s3`` name)."""
        status, body = self._upstream("PUT", f"/{self.bucket}")
        if status != 200:
            raise RuntimeError(f"creating {self.bucket!r} upstream failed: HTTP {status} {body[:200]!r}")

    def _upstream(self, method: str, path: str) -> tuple[int, bytes]:
        """(status, body) of a bodiless request to the upstream server."""
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=30)
        try:
            conn.request(method, path, headers=self.sign_upstream(method, path, "", hashlib.sha256(b"").hexdigest()))
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def expire_sessions(self) -> None:
        """End every session now, as if their time had run out."""
        with self._lock:
            self._sessions = {t: Session(s.access_key, s.secret_key, t, s.bucket, 0.0) for t, s in self._sessions.items()}

    # -- the two halves of S3 Express auth ------------------------------------------------
    def create_session(self, bucket: str) -> Session:
        session = Session("ASIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30), secrets.token_urlsafe(48),
                          bucket, time.time() + self.session_ttl_s)
        with self._lock:
            self._sessions[session.token] = session
            self.sessions_created += 1
        return session

    def verify(self, method: str, path: str, raw_query: str, headers: dict[str, str], session_auth: bool) -> Session | None:
        """Check the request's SigV4 signature; for data requests, against a live session's secret."""
        auth = headers.get("authorization", "")
        if not auth.startswith("AWS4-HMAC-SHA256 "):
            raise AuthFailure("AccessDenied", "SigV4 Authorization header required")
        fields = dict(part.strip().split("=", 1) for part in auth[len("AWS4-HMAC-SHA256 "):].split(","))
        access_key, _, scope = fields.get("Credential", "").partition("/")
        signed = fields.get("SignedHeaders", "").split(";")
        session = None
        if session_auth:
            token = headers.get("x-amz-s3session-token")
            with self._lock:
                session = self._sessions.get(token or "")
            if session is None:
                raise AuthFailure("InvalidToken", "unknown or missing x-amz-s3session-token")
            if session.expires <= time.time():
                raise AuthFailure("ExpiredToken", "the session has expired")
            if "x-amz-s3session-token" not in signed:
                raise AuthFailure("AccessDenied", "x-amz-s3session-token must be signed")
            expected_key, secret = session.access_key, session.secret_key
        else:
            if self.credentials_expired:
                raise AuthFailure("ExpiredToken", "the credentials that sign CreateSession have expired")
            expected_key, secret = self.access_key, self._secret_key
        if access_key != expected_key or scope.count("/") != 3 or scope.split("/")[2] not in ("s3", "s3express"):
            raise AuthFailure("InvalidAccessKeyId", "unknown access key or malformed credential scope")
        payload = headers.get("x-amz-content-sha256", "UNSIGNED-PAYLOAD")
        expected = signature(secret, headers.get("x-amz-date", ""), scope, method, path, raw_query, headers, signed,
                             payload)
        if not hmac.compare_digest(expected, fields.get("Signature", "")):
            raise AuthFailure("SignatureDoesNotMatch", "the request signature does not match")
        return session

    def sign_upstream(self, method: str, path: str, raw_query: str, payload_hash: str) -> dict[str, str]:
        """Headers that authenticate a forwarded request to the upstream server."""
        access_key, secret = self._upstream_keys
        now = _dt.datetime.now(_dt.timezone.utc)
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        scope = f"{amz_date[:8]}/{self.region}/s3/aws4_request"
        headers = {"host": f"{self.upstream_host}:{self.upstream_port}", "x-amz-content-sha256": payload_hash,
                   "x-amz-date": amz_date}
        signed = sorted(headers)
        sig = signature(secret, amz_date, scope, method, path, raw_query, headers, signed, payload_hash)
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                                    f"SignedHeaders={';'.join(signed)}, Signature={sig}")
        return headers


def _serve_tls(context: ssl.SSLContext, connection, client_address, server, handler: Callable[..., Any]) -> None:
    """Handshake on ``connection`` (in the calling thread, with a time limit) and serve HTTP over it."""
    connection.settimeout(10)
    try:
        tls = context.wrap_socket(connection, server_side=True)
    except (ssl.SSLError, OSError):  # a client that rejects the certificate, or gives up
        return
    tls.settimeout(None)  # the limit was for the handshake; kept-alive connections may idle
    try:
        handler(tls, client_address, server)
    finally:
        tls.close()


class _TlsServer(ThreadingHTTPServer):
    """HTTPS, with each handshake in the connection's own thread rather than in ``accept``."""

    daemon_threads = True

    def __init__(self, address, handler: type, context: ssl.SSLContext) -> None:
        super().__init__(address, handler)
        self.context = context

    def finish_request(self, request, client_address) -> None:
        _serve_tls(self.context, request, client_address, self, self.RequestHandlerClass)


def _error_xml(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"</Error>").encode()


def _handler_for(gateway: S3ExpressGateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _answer(self, status: int, body: bytes, content_type: str = "application/xml") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _bucket_and_key(self, path: str) -> tuple[str, str]:
            """(bucket, path inside the bucket), from a virtual-hosted host or a path-style path."""
            host = self.headers.get("Host", "").rsplit(":", 1)[0]
            if host.endswith(".localhost"):
                return host[: -len(".localhost")], path
            if gateway.zonal_domain and host.endswith("." + gateway.zonal_domain):
                return host[: -len(gateway.zonal_domain) - 1], path
            bucket, _, rest = path.lstrip("/").partition("/")
            if not bucket:
                return gateway.bucket, "/"
            return bucket, "/" + rest

        def _drain(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            while length > 0:
                length -= len(self.rfile.read(min(CHUNK, length)))

        def _handle(self) -> None:
            path, _, raw_query = self.path.partition("?")
            headers = {k.lower(): v for k, v in self.headers.items()}
            bucket, key_path = self._bucket_and_key(path)
            is_create_session = key_path == "/" and "session" in urllib.parse.parse_qs(raw_query, keep_blank_values=True)
            try:
                gateway.verify(self.command, path, raw_query, headers, session_auth=not is_create_session)
            except AuthFailure as failure:
                with gateway._lock:
                    gateway.rejected.append(failure.code)
                self._drain()
                self._answer(403 if failure.code != "ExpiredToken" else 400, _error_xml(failure.code, str(failure)))
                return
            if is_create_session:
                if not gateway.bucket_exists(bucket):
                    self._answer(404, _error_xml("NoSuchBucket", f"the bucket {bucket} does not exist"))
                    return
                session = gateway.create_session(bucket)
                expiration = _dt.datetime.fromtimestamp(session.expires, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                self._answer(200, (
                    '<?xml version="1.0" encoding="UTF-8"?>\n'
                    '<CreateSessionResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Credentials>'
                    f"<SessionToken>{session.token}</SessionToken><SecretAccessKey>{session.secret_key}</SecretAccessKey>"
                    f"<AccessKeyId>{session.access_key}</AccessKeyId><Expiration>{expiration}</Expiration>"
                    "</Credentials></CreateSessionResult>").encode())
                return
            self._forward(bucket, key_path, raw_query, headers)

        def _forward(self, bucket: str, key_path: str, raw_query: str, headers: dict[str, str]) -> None:
            upstream_path = f"/{bucket}{key_path if key_path != '/' else ''}"
            payload = headers.get("x-amz-content-sha256", "UNSIGNED-PAYLOAD")
            length = int(headers.get("content-length") or 0)
            conn = http.client.HTTPConnection(gateway.upstream_host, gateway.upstream_port, timeout=60)
            try:
                conn.putrequest(self.command, upstream_path + (f"?{raw_query}" if raw_query else ""),
                                skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _HOP:
                        conn.putheader(name, value)
                for name, value in gateway.sign_upstream(self.command, upstream_path, raw_query, payload).items():
                    if name != "x-amz-content-sha256" or "x-amz-content-sha256" not in headers:
                        conn.putheader(name, value)
                conn.endheaders()
                while length > 0:
                    chunk = self.rfile.read(min(CHUNK, length))
                    if not chunk:
                        break
                    conn.send(chunk)
                    length -= len(chunk)
                response = conn.getresponse()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in _HOP:
                        self.send_header(name, value)
                if response.getheader("Content-Length") is None and self.command != "HEAD":
                    body = response.read()
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.end_headers()
                    while chunk := response.read(CHUNK):
                        self.wfile.write(chunk)
            finally:
                conn.close()
            with gateway._lock:
                gateway.requests_served += 1

        def do_CONNECT(self) -> None:
            host, _, port = self.path.rpartition(":")
            if gateway._zonal_tls is None or port != "443" or not host.endswith(f".{gateway.zonal_domain}"):
                self._answer(403, _error_xml("AccessDenied", f"this test proxy only tunnels to *.{gateway.zonal_domain}"))
                return
            self.send_response(200, "Connection established")
            self.end_headers()
            # Serve the requests inside the tunnel on this thread, as if they had arrived directly.
            _serve_tls(gateway._zonal_tls, self.connection, self.client_address, self.server, Handler)
            self.close_connection = True

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
