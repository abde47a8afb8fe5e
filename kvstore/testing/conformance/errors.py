"""The conformance cases about errors and damaged objects: wrong credentials, a missing bucket,
a dead endpoint (each on every read call, sync and async), and objects altered behind the store.

Registered into ``CASES`` when ``cases`` imports this module, after the other cases, so ids
keep their order.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

from kvstore.config import Credentials, Secret
from kvstore.config.profiles import express_zone
from kvstore.errors import AuthError, BucketNotFound, IntegrityError, StoreTimeout, StoreUnavailable
from kvstore.store import KVStore
from kvstore.testing.conformance.cases import Skip, StoreFactory, _needs_s3, _random_bytes, _reopen, case


# -- errors --------------------------------------------------------------------------------------
def _expect(error: type[BaseException] | tuple, action: Callable[[], object], what: str) -> BaseException:
    try:
        action()
    except error as exc:
        return exc
    except Exception as exc:
        raise AssertionError(f"{what}: raised {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"{what}: nothing was raised")


def _outcome(error: type[BaseException] | tuple, value: object = None, exc: BaseException | None = None) -> str | None:
    """None when ``exc`` is an ``error``, else what happened instead."""
    if exc is None:
        return f"nothing was raised (returned {value!r})"
    if isinstance(exc, error):
        return None
    return f"raised {type(exc).__name__}: {exc}"


def _expect_all(error: type[BaseException], calls: list[tuple[str, Callable[[], object]]], what: str) -> None:
    """Every call raises ``error``; one AssertionError names each call that did not."""
    problems = []
    for name, action in calls:
        try:
            value = action()
        except Exception as exc:  # judged by _outcome: the wrong kind is a problem, not a crash
            problem = _outcome(error, exc=exc)
        else:
            problem = _outcome(error, value)
        if problem:
            problems.append(f"{name}: {problem}")
    assert not problems, f"{what}: " + "; ".join(problems)


def _expect_all_async(error: type[BaseException], store: KVStore, what: str) -> None:
    """aget, aget_into, aexists, astat, aexists_many (and alist) each raise ``error``, on one loop."""
    calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("aget", lambda: store.aget("k")),
        ("aget_into", lambda: store.aget_into("k", bytearray(16))),
        ("aexists", lambda: store.aexists("k")),
        ("astat", lambda: store.astat("k")),
        ("aexists_many", lambda: store.aexists_many(["k", "k2"])),
    ]
    if store.backend.capabilities.listing:
        async def alist() -> list[str]:
            return [k async for k in store.alist()]
        calls.append(("alist", alist))

    async def run() -> list[str]:
        problems = []
        for name, make in calls:
            try:
                value = await make()
            except Exception as exc:  # judged by _outcome
                problem = _outcome(error, exc=exc)
            else:
                problem = _outcome(error, value)
            if problem:
                problems.append(f"{name}: {problem}")
        return problems

    problems = asyncio.run(run())
    assert not problems, f"{what}: " + "; ".join(problems)


def _sync_reads(store: KVStore) -> list[tuple[str, Callable[[], object]]]:
    """Every sync read but get (which error-auth and error-missing-bucket check with put)."""
    calls: list[tuple[str, Callable[[], object]]] = [
        ("get_into", lambda: store.get_into("k", bytearray(16))),
        ("exists", lambda: store.exists("k")),
        ("stat", lambda: store.stat("k")),
        ("exists_many", lambda: store.exists_many(["k", "k2"])),
        # Not reads, but S3 answers a DELETE of a missing object 204: a store that is not there must still fail.
        ("discard", lambda: store.discard("k")),
        ("discard_many", lambda: store.discard_many(["k", "k2"])),
    ]
    if store.backend.capabilities.listing:
        calls.append(("list", lambda: list(store.list())))
    return calls


def _wrong_secret(store: KVStore) -> KVStore:
    """The store reopened with its access key and a wrong secret, or Skip."""
    _needs_s3(store, "wrong credentials")
    creds = store.config.credentials
    if creds.source != "static" or not creds.access_key_id:
        raise Skip(f"the store has no static credentials to spoil (source {creds.source!r})")
    wrong = Credentials("static", creds.access_key_id, Secret("wrong-" + uuid.uuid4().hex))
    return _reopen(store, credentials=wrong)


def _missing_bucket(store: KVStore) -> tuple[KVStore, str]:
    """The store reopened on a bucket that does not exist (same zone, same addressing), or Skip."""
    _needs_s3(store, "a missing bucket")
    config = store.config
    other = f"kvstore-missing-{uuid.uuid4().hex[:12]}"
    zone = express_zone(config.bucket)
    if zone:  # a directory bucket name, in the same zone
        other += f"--{zone}--x-s3"
    endpoint = config.endpoint
    if config.addressing == "virtual":  # the bucket is part of the host name
        endpoint = endpoint.replace(f"//{config.bucket}.", f"//{other}.", 1)
    return _reopen(store, bucket=other, endpoint=endpoint), other


@case("error-auth")
def error_auth(factory: StoreFactory) -> None:
    """A wrong secret key gives AuthError (on a read and on a write)."""
    with factory() as store, _wrong_secret(store) as bad:
        _expect(AuthError, lambda: bad.get("k"), "get with a wrong secret")
        _expect(AuthError, lambda: bad.put("k", b"x"), "put with a wrong secret")


@case("error-auth-reads")
def error_auth_reads(factory: StoreFactory) -> None:
    """A wrong secret key gives AuthError on get_into, exists, stat, exists_many and list."""
    with factory() as store, _wrong_secret(store) as bad:
        _expect_all(AuthError, _sync_reads(bad), "with a wrong secret")


@case("error-auth-async")
def error_auth_async(factory: StoreFactory) -> None:
    """A wrong secret key gives AuthError on aget, aget_into, aexists, astat, aexists_many and alist."""
    with factory() as store, _wrong_secret(store) as bad:
        _expect_all_async(AuthError, bad, "with a wrong secret")


@case("error-missing-bucket")
def error_missing_bucket(factory: StoreFactory) -> None:
    """A bucket that does not exist gives BucketNotFound (on a read and on a write)."""
    with factory() as store:
        bad, other = _missing_bucket(store)
        with bad:
            _expect(BucketNotFound, lambda: bad.get("k"), f"get from missing bucket {other}")
            _expect(BucketNotFound, lambda: bad.put("k", b"x"), f"put into missing bucket {other}")


@case("error-missing-bucket-reads")
def error_missing_bucket_reads(factory: StoreFactory) -> None:
    """A missing bucket gives BucketNotFound on get_into, exists, stat, exists_many and list, never a miss."""
    with factory() as store:
        bad, other = _missing_bucket(store)
        with bad:
            _expect_all(BucketNotFound, _sync_reads(bad), f"missing bucket {other}")


@case("error-missing-bucket-async")
def error_missing_bucket_async(factory: StoreFactory) -> None:
    """A missing bucket gives BucketNotFound on aget, aget_into, aexists, astat, aexists_many and alist."""
    with factory() as store:
        bad, other = _missing_bucket(store)
        with bad:
            _expect_all_async(BucketNotFound, bad, f"missing bucket {other}")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


@case("error-unreachable")
def error_unreachable(factory: StoreFactory) -> None:
    """An endpoint nobody listens on gives StoreTimeout or StoreUnavailable within the deadline."""
    with factory() as store:
        _needs_s3(store, "an unreachable endpoint")
        dead = f"http://127.0.0.1:{_closed_port()}"
        timeout = 2.0
        with _reopen(store, endpoint=dead, base_endpoint=dead, addressing="path", tls=False, s3express=False,
                     proxy_url=None, timeout_s=timeout, connect_timeout_s=0.5) as bad:
            started = time.monotonic()
            _expect((StoreTimeout, StoreUnavailable), lambda: bad.get("k"), f"get from {dead}")
            elapsed = time.monotonic() - started
            assert elapsed < timeout + 3.0, f"took {elapsed:.1f} s with kvstore_timeout_s={timeout}"


# -- integrity -----------------------------------------------------------------------------------
def _tamper_case(case_id: str, describe: str, alter: Callable[[bytes], bytes]) -> None:
    def run(factory: StoreFactory) -> None:
        with factory() as store:
            if not store.backend.capabilities.metadata:
                raise Skip("the backend keeps no metadata, so no checksum rides with the object")
            data = _random_bytes(64 * 1024, 11)
            with _reopen(store, checksum="crc32c") as checked, _reopen(store, checksum="none") as raw:
                checked.put("k", data)
                info = checked.stat("k")
                assert info is not None and "kvstore-crc32c" in info.metadata, f"no checksum stored: {info}"
                # Same metadata (the checksum), other bytes. Through the backend: the store refuses
                # a caller's 'kvstore-' metadata, as it must.
                raw.backend.put(raw.name_of("k"), memoryview(alter(data)), dict(info.metadata))
                for how, read in (("get", lambda: checked.get("k")),
                                  ("get_into", lambda: checked.get_into("k", bytearray(len(data))))):
                    try:
                        got = read()
                    except IntegrityError:
                        continue
                    assert got is None, f"{how} returned altered bytes as good data"

    run.__doc__ = describe
    case(case_id)(run)


def _flip_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


_tamper_case("integrity-altered", "An object altered behind the store's back raises IntegrityError.", _flip_middle)
_tamper_case("integrity-truncated", "An object truncated behind the store's back raises IntegrityError.", lambda d: d[: len(d) // 2])
