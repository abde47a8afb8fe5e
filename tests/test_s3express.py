"""S3 Express session auth through the loopback gateway (CreateSession, session reuse and refresh, rejection).

The gateway stands in for a zonal endpoint in front of moto. To run the same round trip against a
real directory bucket, set KVSTORE_S3EXPRESS_URL=s3://NAME--AZID--x-s3/prefix with AWS credentials
in the environment (see docs/reliability.md).
"""

from __future__ import annotations

import os
import time
import urllib.request

import pytest

import kvstore
from kvstore.backends import backend_class
from kvstore.testing.s3express_gateway import S3ExpressGateway

pytestmark = pytest.mark.timeout(60)
TTL_S = 8  # the CRT treats a session as expired 5 s before its Expiration


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
    """obstore builds the zonal host itself for NAME--AZID--x-s3 buckets (its CreateSession ignores
    ``endpoint``), so its session auth is exercised only here, against a real directory bucket."""
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
