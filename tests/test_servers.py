"""The real loopback S3 servers of kvstore.testing.servers: start, use, reject bad keys, stop by PID,
and the limits a server declares are still real.

One server of each kind is started per module (Ceph dominates: a few seconds); the tests for a
server run in file order, the last one stops it and checks that nothing of it is left.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

import pytest

from kvstore.testing import servers

boto3 = pytest.importorskip("boto3")
from botocore.config import Config  # noqa: E402
from botocore.exceptions import BotoCoreError, ClientError  # noqa: E402

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module", params=servers.SERVER_NAMES)
def managed(request):
    reason = servers.available(request.param)
    if reason:
        pytest.skip(f"{request.param} cannot run here: {reason}")
    m = servers.start(request.param)
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def bucket(managed):
    name = f"ts-{uuid.uuid4().hex[:12]}"
    managed.server.create_bucket(name)
    yield name
    if managed.alive:
        managed.server.delete_bucket(name)


def _client(srv: servers.S3Server, *, access_key=None, secret_key=None, style="path"):
    return boto3.session.Session().client(
        "s3",
        endpoint_url=srv.endpoint if style == "path" else srv.virtual_endpoint,
        region_name=srv.region,
        aws_access_key_id=access_key or srv.access_key,
        aws_secret_access_key=secret_key or srv.secret_key,
        config=Config(s3={"addressing_style": style}, retries={"max_attempts": 1}),
    )


def _refused_keys(managed) -> dict[str, str]:
    """Keys the server must refuse: a wrong secret, or an unknown access key id where the server
    declares that it checks no signature."""
    if any(limit.id == "sigv4" for limit in managed.limits):
        return {"access_key": "AKIAKVSTORENOSUCHKEY"}
    return {"secret_key": managed.server.secret_key + "x"}


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_describes_itself(managed):
    srv = managed.server
    assert srv.name == managed.name
    assert srv.host == "127.0.0.1"
    assert srv.endpoint == f"http://127.0.0.1:{srv.port}"
    assert srv.region == "us-east-1"
    assert srv.url("b", "p/q") == "s3://b/p/q"
    assert srv.url("b") == "s3://b"
    cfg = srv.extra_config(s3_part_size=5)
    assert cfg == {
        "s3_endpoint_url": srv.endpoint,
        "aws_access_key_id": srv.access_key,
        "aws_secret_access_key": srv.secret_key,
        "s3_region": "us-east-1",
        "s3_addressing_style": "path",
        "s3_part_size": 5,
    }
    assert managed.alive and managed.pids
    assert managed.start_seconds is not None
    print(f"{managed.name} started in {managed.start_seconds:.1f} s")


def test_put_get_path_style(managed, bucket):
    c = _client(managed.server)
    body = os.urandom(100_000)
    c.put_object(Bucket=bucket, Key="dir/obj", Body=body)
    assert c.get_object(Bucket=bucket, Key="dir/obj")["Body"].read() == body
    part = c.get_object(Bucket=bucket, Key="dir/obj", Range="bytes=10-19")
    assert part["Body"].read() == body[10:20]
    managed.server.create_bucket(bucket)  # idempotent
    assert [o["Key"] for o in c.list_objects_v2(Bucket=bucket)["Contents"]] == ["dir/obj"]


def test_delete_bucket_empties_it(managed):
    srv = managed.server
    name = f"td-{uuid.uuid4().hex[:12]}"
    srv.create_bucket(name)
    c = _client(srv)
    for i in range(3):
        c.put_object(Bucket=name, Key=f"k{i}", Body=b"x")
    srv.delete_bucket(name)
    srv.delete_bucket(name)  # already gone: no error
    with pytest.raises(ClientError) as e:
        c.head_bucket(Bucket=name)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


@pytest.mark.parametrize("wrong", ["secret", "access_key"])
def test_wrong_credentials_rejected(managed, bucket, wrong):
    srv = managed.server
    _client(srv).put_object(Bucket=bucket, Key="k", Body=b"v")
    if wrong == "secret" and any(limit.id == "sigv4" for limit in managed.limits):
        # The declared limit is still real: a wrong secret gets in (a fixed server fails here).
        assert _client(srv, secret_key="wrong").get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"
        pytest.skip(f"{managed.name} declares that it checks no signature")
    if wrong == "secret":
        bad = _client(srv, secret_key=srv.secret_key + "x")
    else:
        bad = _client(srv, access_key="AKIAKVSTORENOSUCHKEY")
    for call in (lambda: bad.get_object(Bucket=bucket, Key="k"),
                 lambda: bad.put_object(Bucket=bucket, Key="k2", Body=b"v"),
                 bad.list_buckets):
        with pytest.raises(ClientError) as e:
            call()
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError):
        _client(srv).head_object(Bucket=bucket, Key="k2")  # the rejected PUT stored nothing


def test_virtual_hosted(managed, bucket):
    srv = managed.server
    if not servers.virtual_hosting_works():
        assert srv.virtual_host_domain is None
        pytest.skip("*.localhost does not resolve to 127.0.0.1 here (scripts/install-test-servers.sh)")
    assert srv.virtual_host_domain is not None and srv.virtual_host_domain.endswith("localhost")
    assert srv.virtual_endpoint == f"http://{srv.virtual_host_domain}:{srv.port}"
    addrs = {ai[4][0] for ai in socket.getaddrinfo(f"{bucket}.{srv.virtual_host_domain}", srv.port,
                                                   type=socket.SOCK_STREAM)}
    assert "127.0.0.1" in addrs
    if "::1" in addrs:
        # The server listens on 127.0.0.1 only; [::1]:PORT is held (bound, not listening), so a
        # client that tries ::1 first is refused at once and falls back to 127.0.0.1.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("::1", srv.port), timeout=2).close()
    v = _client(srv, style="virtual")
    v.put_object(Bucket=bucket, Key="via-virtual", Body=b"vhost")
    assert v.get_object(Bucket=bucket, Key="via-virtual")["Body"].read() == b"vhost"
    assert _client(srv).get_object(Bucket=bucket, Key="via-virtual")["Body"].read() == b"vhost"
    assert srv.client("virtual").head_object(Bucket=bucket, Key="via-virtual")["ContentLength"] == 5
    bad = _client(srv, style="virtual", **_refused_keys(managed))
    with pytest.raises(ClientError) as e:
        bad.get_object(Bucket=bucket, Key="via-virtual")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_kill_and_restart(managed, bucket):
    srv = managed.server
    c = _client(srv)
    c.put_object(Bucket=bucket, Key="survivor", Body=b"still here")
    before = set(managed.pids)
    managed.kill()
    assert not managed.alive
    with pytest.raises(Exception):  # noqa: B017 - a refused or reset connection, by the OS's choice
        _client(srv).list_buckets()
    t0 = time.monotonic()
    managed.restart()
    print(f"{managed.name} restarted in {time.monotonic() - t0:.1f} s")
    assert managed.server == srv  # same port, same keys
    assert managed.alive and set(managed.pids) != before
    c = _client(srv)
    if managed.restart_keeps_data:
        assert c.get_object(Bucket=bucket, Key="survivor")["Body"].read() == b"still here"
    else:
        srv.create_bucket(bucket)
    c.put_object(Bucket=bucket, Key="after", Body=b"ok")
    assert c.get_object(Bucket=bucket, Key="after")["Body"].read() == b"ok"
    with pytest.raises(ClientError) as e:
        _client(srv, **_refused_keys(managed)).list_buckets()
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_declared_limits_are_real(managed, bucket):
    """Each limit a server declares (its conformance cases skip for it) still holds: a server that
    learns the feature fails here, so its skips get removed rather than hide a pass."""
    c = _client(managed.server)
    seen = set()
    for limit in managed.limits:
        seen.add(limit.id)
        if limit.id == "sigv4":
            c.put_object(Bucket=bucket, Key="sig", Body=b"v")
            assert _client(managed.server, secret_key="wrong").get_object(Bucket=bucket, Key="sig")["Body"].read() == b"v"
        elif limit.id == "conditional-put":
            c.put_object(Bucket=bucket, Key="cond", Body=b"first")
            c.put_object(Bucket=bucket, Key="cond", Body=b"second", IfNoneMatch="*")
            assert c.get_object(Bucket=bucket, Key="cond")["Body"].read() == b"second"
        elif limit.id == "delete-objects-whitespace":
            c.put_object(Bucket=bucket, Key="sp ", Body=b"v")
            answer = c.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "sp "}]})
            assert [d["Key"] for d in answer["Deleted"]] == ["sp"]
            assert [o["Key"] for o in c.list_objects_v2(Bucket=bucket, Prefix="sp")["Contents"]] == ["sp "]
        elif limit.id == "atomic-overwrite":
            assert _overwrite_shows_a_torn_object(c, bucket), "every read racing a put saw a whole object"
        elif limit.id in ("list-order", "list-resume", "list-start-after"):
            names = ["o/a-x", "o/a/1", "o/a/b/2", "o/a0"]  # S3's order
            for name in names:
                c.put_object(Bucket=bucket, Key=name, Body=b"")

            def listed(**kw):
                return [o["Key"] for o in c.list_objects_v2(Bucket=bucket, **kw).get("Contents", [])]

            if limit.id == "list-order":
                assert listed(Prefix="o/") != names, "the server lists in S3's order now"
            elif limit.id == "list-resume":
                order = listed(Prefix="o/")
                assert listed(Prefix="o/", StartAfter=order[-2]) != order[-1:], "start-after follows the listing's order now"
            else:
                assert "o/a/1" not in listed(Prefix="o/", StartAfter="o/a"), "start-after='o/a' keeps 'o/a/1' now"
        else:
            raise AssertionError(f"{managed.name}: no check for declared limit {limit.id!r}")
        assert limit.cases and limit.what, limit
    assert seen == {limit.id for limit in servers.known_limits(managed.name)}


def _overwrite_shows_a_torn_object(c, bucket: str, size: int = 16 * 1024 * 1024, rounds: int = 8) -> bool:
    """Whether a GET racing PUTs of one key ever sees something other than one whole value."""
    values = [bytes([i]) * size for i in range(2)]
    c.put_object(Bucket=bucket, Key="race", Body=values[0])
    for i in range(rounds):
        writer = threading.Thread(target=c.put_object, kwargs={"Bucket": bucket, "Key": "race", "Body": values[(i + 1) % 2]})
        writer.start()
        try:
            while writer.is_alive():
                try:
                    if c.get_object(Bucket=bucket, Key="race")["Body"].read() not in values:
                        return True
                except (ClientError, BotoCoreError):
                    return True  # 416 while the file is empty, or a body cut short as it shrinks
        finally:
            writer.join()
    return False


def test_stop_leaves_nothing(managed):
    pids = managed.pids
    port = managed.server.port
    workdir = managed.workdir
    assert pids and workdir.is_dir()
    t0 = time.monotonic()
    managed.stop()
    print(f"{managed.name} stopped in {time.monotonic() - t0:.1f} s")
    managed.stop()  # idempotent
    assert not managed.alive and managed.pids == []
    assert all(_pid_gone(pid) for pid in pids)
    assert servers.port_is_free(port)
    assert not workdir.exists()
    if managed.name == "seaweedfs":
        assert not [p for p in os.listdir("/tmp") if p.startswith("seaweedfs-") and p.endswith(
            tuple(f"-{port}.sock" for port in managed.ports.values()))]


# -- moto specifics (cheap: moto starts in about a second) ------------------------------------------


def _need_moto():
    reason = servers.available("moto")
    if reason:
        pytest.skip(reason)


@pytest.mark.slow  # moto replays its request recording: ~15 s
def test_moto_persist_survives_restart():
    _need_moto()
    with servers.start_moto(persist=True) as m:
        srv = m.server
        srv.create_bucket("persisted")
        c = _client(srv)
        c.put_object(Bucket="persisted", Key="bin", Body=bytes(range(256)) * 40)
        m.kill()
        m.restart()
        assert m.server == srv
        assert _client(srv).get_object(Bucket="persisted", Key="bin")["Body"].read() == bytes(range(256)) * 40


def test_moto_restart_after_stop_same_port_and_keys():
    _need_moto()
    m = servers.start_moto()
    try:
        srv = m.server
        m.stop()
        m.restart()
        assert m.server == srv and m.alive
        srv.create_bucket("again")
        with pytest.raises(ClientError):
            _client(srv, secret_key="wrong").list_buckets()
    finally:
        m.stop()
    assert servers.port_is_free(srv.port)


def test_moto_without_auth_accepts_any_keys():
    _need_moto()
    with servers.start_moto(auth=False) as m:
        c = _client(m.server, access_key="anything", secret_key="goes")
        c.create_bucket(Bucket="open")
        c.put_object(Bucket="open", Key="k", Body=b"v")
        assert c.get_object(Bucket="open", Key="k")["Body"].read() == b"v"


def test_start_failure_reports_log_tail(monkeypatch):
    _need_moto()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    monkeypatch.setattr(servers.moto, "free_port", lambda host="127.0.0.1": port)  # the port MotoServer takes
    try:
        with pytest.raises(servers.ServerStartError) as e:
            servers.start_moto(timeout=15)
    finally:
        taken.close()
    text = str(e.value)
    assert "moto" in text and "log tail" in text
    assert "in use" in text.lower()


def test_available_and_unknown_names():
    for name in servers.SERVER_NAMES:
        reason = servers.available(name)
        assert reason is None or isinstance(reason, str) and reason
    with pytest.raises(ValueError):
        servers.available("minio")
    with pytest.raises(ValueError):
        servers.start("minio")
    with pytest.raises(ValueError):
        servers.known_limits("minio")


def test_limit_skips_name_the_server_and_real_cases():
    from kvstore.testing.conformance import case_by_id

    assert servers.limit_skips("moto") == {}
    skips = servers.limit_skips("s3rver")
    assert {"error-auth", "error-auth-reads", "error-auth-async", "conditional-put", "key-spaces"} <= set(skips)
    for case_id, reason in skips.items():
        case_by_id(case_id)  # a declared skip names a case that exists
        assert reason.startswith("s3rver ") and len(reason) > 30


def test_free_ports_are_distinct_and_free():
    ports = servers.free_ports(12)
    assert len(set(ports)) == 12
    assert all(servers.port_is_free(p) for p in ports)


def test_servers_die_with_their_owner():
    """A process that starts a server and is SIGKILLed (no atexit, no fixture teardown) leaves
    nothing behind: the guard process ends the server's process group and removes its state."""
    _need_moto()
    import json
    import signal
    import subprocess
    import sys

    code = (
        "import json, sys, time\n"
        "from kvstore.testing import servers\n"
        "m = servers.start_moto()\n"
        "print(json.dumps({'pids': m.pids, 'port': m.server.port, 'dir': str(m.workdir)}), flush=True)\n"
        "time.sleep(120)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(owner.stdout.readline())
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(_pid_gone(p) for p in info["pids"]):
        time.sleep(0.1)
    assert all(_pid_gone(p) for p in info["pids"])
    while time.monotonic() < deadline and os.path.exists(info["dir"]):
        time.sleep(0.1)
    assert not os.path.exists(info["dir"])
    assert servers.port_is_free(info["port"])
