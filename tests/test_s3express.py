"""S3 Express session auth through the loopback gateway (CreateSession, session reuse and refresh, rejection).

The gateway stands in for a zonal endpoint in front of moto. The CRT takes it as its endpoint
(plain HTTP); obstore goes to AWS's own zonal host, so it reaches the gateway as its HTTPS proxy,
over TLS checked against a throwaway CA, with the real "s3express" profile. To run the same round
trip against a real directory bucket, set KVSTORE_S3EXPRESS_URL=s3://NAME--AZID--x-s3/prefix with
AWS credentials in the environment (see docs/reliability.md).
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.request

import pytest

import kvstore
from kvstore.backends import backend_class
from kvstore.testing.s3express_gateway import S3ExpressGateway
from kvstore.testing.tls import ThrowawayCA

pytestmark = [pytest.mark.servers, pytest.mark.timeout(60)]
TTL_S = 8  # the CRT treats a session as expired 5 s before its Expiration
OBSTORE_SESSION_S = 300  # obstore keeps a session this long by its own clock, whatever Expiration says


def require(backend: str) -> None:
    try:
        backend_class(backend)
    except (ImportError, ModuleNotFoundError) as exc:
        pytest.skip(f"{backend} backend not available: {exc}")


@pytest.fixture
def gateway(s3_servers, unique_name):
    server = s3_servers.get("moto")
    bucket = f"{unique_name('kv')}--use1-az4--x-s3"
    with S3ExpressGateway(server.endpoint, server.access_key, server.secret_key, bucket=bucket, region=server.region,
                          session_ttl_s=TTL_S) as gw:
        gw.create_bucket()
        yield server, gw


@pytest.fixture
def zonal_gateway(s3_servers, unique_name, tmp_path):
    """The gateway as the zonal host itself, reached through CONNECT, granting sessions as long as AWS's."""
    server = s3_servers.get("moto")
    bucket = f"{unique_name('kv')}--use1-az4--x-s3"
    with S3ExpressGateway(server.endpoint, server.access_key, server.secret_key, bucket=bucket, region="us-east-1",
                          session_ttl_s=OBSTORE_SESSION_S, ca=ThrowawayCA(tmp_path)) as gw:
        gw.create_bucket()
        yield server, gw


def open_zonal(server, gw: S3ExpressGateway, backend: str = "obstore", **extra) -> kvstore.KVStore:
    """The real "s3express" profile (TLS, zonal host, session auth), via the gateway as proxy."""
    require(backend)
    config = {"kvstore_backend": backend, "aws_access_key_id": server.access_key,
              "aws_secret_access_key": server.secret_key, "s3_proxy_url": gw.proxy_url, "s3_ca_bundle": gw.ca_file,
              "kvstore_timeout_s": 5, "kvstore_breaker_threshold": 0, **extra}
    store = kvstore.open(f"s3://{gw.bucket}/p", config)
    assert (store.config.profile, store.config.tls, store.config.s3express) == ("s3express", True, True)
    return store


def open_express(server, gw: S3ExpressGateway, backend: str) -> kvstore.KVStore:
    # The "s3express" profile insists on TLS; the loopback gateway speaks plain HTTP, so the generic
    # "s3" profile with session auth switched on is used instead.
    return kvstore.open(f"s3://{gw.bucket}/p", server.extra_config(
        s3_endpoint_url=gw.endpoint, kvstore_profile="s3", kvstore_backend=backend, s3_enable_s3express=True,
        kvstore_timeout_s=5, kvstore_breaker_threshold=0))


def test_crt_round_trip_with_one_reused_session(gateway):
    require("crt")
    server, gw = gateway
    with open_express(server, gw, "crt") as store:
        for i in range(20):
            store.put(f"k{i}", bytes([i]) * 1000)
        assert store.get_many([f"k{i}" for i in range(20)]) == [bytes([i]) * 1000 for i in range(20)]
        assert store.get("absent") is None
        assert gw.sessions_created == 1
        assert gw.requests_served >= 41
        assert gw.rejected == []


def test_crt_refreshes_an_expiring_session(gateway):
    require("crt")
    server, gw = gateway
    with open_express(server, gw, "crt") as store:
        store.put("k", b"before")
        assert gw.sessions_created == 1
        time.sleep(TTL_S - 5 + 0.5)  # past the CRT's 5 s safety margin
        assert store.get("k") == b"before"
        assert gw.sessions_created == 2
        assert gw.rejected == []


def test_expired_session_is_rejected(gateway):
    require("crt")
    server, gw = gateway
    with open_express(server, gw, "crt") as store:
        store.put("k", b"v")
        gw.expire_sessions()  # the client still believes its session is good
        with pytest.raises(kvstore.KVStoreError):
            store.get("k")
        assert "ExpiredToken" in gw.rejected


@pytest.mark.parametrize("backend", ["obstore", "fsspec"])
def test_zonal_round_trip_with_one_reused_session(zonal_gateway, backend):
    server, gw = zonal_gateway
    with open_zonal(server, gw, backend) as store:
        for i in range(20):
            store.put(f"k{i}", bytes([i]) * 1000)
        assert store.get_many([f"k{i}" for i in range(20)]) == [bytes([i]) * 1000 for i in range(20)]
        assert store.get("absent") is None
        assert sorted(store.list()) == sorted(f"k{i}" for i in range(20))
        assert gw.sessions_created == 1
        assert gw.requests_served >= 41
        assert gw.rejected == []


def test_obstore_opens_a_new_session_when_the_endpoint_expires_one(zonal_gateway):
    """obstore would keep a session for 5 minutes of its own clock; the backend renews on ExpiredToken."""
    server, gw = zonal_gateway
    with open_zonal(server, gw) as store:
        store.put("k", b"before")
        assert gw.sessions_created == 1
        gw.expire_sessions()
        assert store.get("k") == b"before"  # refused once, retried on a new session
        assert (gw.sessions_created, gw.rejected) == (2, ["ExpiredToken"])
        store.put("k2", b"after")
        assert gw.sessions_created == 2


def test_obstore_without_retries_reports_the_expiry_then_recovers(zonal_gateway):
    server, gw = zonal_gateway
    with open_zonal(server, gw, kvstore_max_retries=0) as store:
        store.put("k", b"v")
        gw.expire_sessions()
        with pytest.raises(kvstore.StoreUnavailable, match="expired"):
            store.get("k")
        assert store.get("k") == b"v"
        assert gw.sessions_created == 2


def test_obstore_rejects_a_zonal_host_it_cannot_verify(zonal_gateway, tmp_path):
    """Without the CA that signed the gateway's certificate, TLS fails and nothing is sent."""
    server, gw = zonal_gateway
    stranger = ThrowawayCA(tmp_path / "other")
    with open_zonal(server, gw, s3_ca_bundle=stranger.ca_file, kvstore_max_retries=0) as store:
        with pytest.raises(kvstore.KVStoreError):
            store.put("k", b"v")
    assert (gw.sessions_created, gw.requests_served) == (0, 0)


def test_obstore_reports_expired_credentials_as_an_auth_error(zonal_gateway):
    """ExpiredToken from CreateSession itself is not a stale session: no new session can cure it."""
    server, gw = zonal_gateway
    with open_zonal(server, gw) as store:
        store.put("k", b"v")
        gw.credentials_expired = True
        gw.expire_sessions()
        with pytest.raises(kvstore.AuthError):
            store.get("k")
        assert gw.sessions_created == 1


@pytest.mark.parametrize("target", ["example.com:443", "s3.us-east-1.amazonaws.com:443",
                                    "kv.s3express-use1-az4.us-east-1.amazonaws.com:80"])
def test_proxy_tunnels_only_to_zonal_hosts(zonal_gateway, target):
    _, gw = zonal_gateway
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    try:
        conn.request("CONNECT", target)
        assert conn.getresponse().status == 403
    finally:
        conn.close()


def test_crt_over_tls_on_the_s3express_profile(zonal_gateway, tmp_path):
    """The CRT's TLS path for real: the s3express profile (HTTPS only, ALPN h2 offered), the CA from s3_ca_bundle."""
    from kvstore.testing.servers import virtual_hosting_works

    require("crt")
    if not virtual_hosting_works():
        pytest.skip("virtual-hosted names (bucket.localhost) do not resolve on this machine")
    server, gw = zonal_gateway
    config = {"kvstore_backend": "crt", "aws_access_key_id": server.access_key,
              "aws_secret_access_key": server.secret_key, "s3_endpoint_url": gw.tls_endpoint,
              "s3_ca_bundle": gw.ca_file, "kvstore_timeout_s": 5, "kvstore_breaker_threshold": 0,
              "kvstore_max_retries": 0}
    with kvstore.open(f"s3://{gw.bucket}/p", config) as store:
        assert (store.config.profile, store.config.tls, store.config.prefer_http2) == ("s3express", True, True)
        for i in range(5):
            store.put(f"k{i}", bytes([i]) * 100_000)
        assert store.get_many([f"k{i}" for i in range(5)]) == [bytes([i]) * 100_000 for i in range(5)]
    assert (gw.sessions_created, gw.rejected) == (1, [])
    served = gw.requests_served
    # The CRT reports a failed TLS negotiation only after its own connection retries (about 27 s),
    # so a store that does not trust the endpoint fails at its deadline.
    stranger = ThrowawayCA(tmp_path / "other")
    with kvstore.open(f"s3://{gw.bucket}/p", {**config, "s3_ca_bundle": stranger.ca_file,
                                               "kvstore_timeout_s": 2}) as store:
        with pytest.raises((kvstore.StoreTimeout, kvstore.StoreUnavailable)):
            store.put("k", b"v")
    assert (gw.sessions_created, gw.requests_served) == (1, served)
    with pytest.raises(kvstore.ConfigError, match="CA bundle"):
        kvstore.open(f"s3://{gw.bucket}/p", {**config, "s3_ca_bundle": str(tmp_path / "missing.pem")})


def test_forged_token_and_unsigned_requests_are_rejected(gateway):
    _, gw = gateway
    forged = urllib.request.Request(f"{gw.endpoint}/{gw.bucket}/k", headers={
        "x-amz-s3session-token": "forged",
        "Authorization": "AWS4-HMAC-SHA256 Credential=ASIAX/20260101/us-east-1/s3express/aws4_request, "
                         "SignedHeaders=host;x-amz-s3session-token, Signature=00"})
    for request in (forged, urllib.request.Request(f"{gw.endpoint}/{gw.bucket}/k")):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=5)
        assert caught.value.code == 403
    assert gw.rejected == ["InvalidToken", "AccessDenied"]
    assert gw.requests_served == 0


@pytest.mark.parametrize("backend", ["crt", "obstore"])
def test_real_directory_bucket_round_trip(backend, unique_name):
    url = os.environ.get("KVSTORE_S3EXPRESS_URL")
    if not url:
        pytest.skip("set KVSTORE_S3EXPRESS_URL=s3://NAME--AZID--x-s3/prefix to test a real S3 Express bucket")
    require(backend)
    with kvstore.open(url, {"kvstore_backend": backend}) as store:
        key = unique_name("express")
        store.put(key, b"x" * 100_000)
        try:
            assert store.get(key) == b"x" * 100_000
        finally:
            store.delete(key)
