"""The conformance matrix: every case against every backend x server, and the CLI's verdicts.

Test ids read ``test_conformance[<backend>-<server>[-<style>]-<case>]``. With the conformance
plugin loaded (``-p kvstore.testing.conformance.plugin``), a per-target summary is printed at the
end and ``--kvstore-matrix FILE`` writes the grid that ``scripts/gen_conformance_doc.py`` renders.
"""

from __future__ import annotations

import importlib.util
import os
import re
import uuid
from dataclasses import dataclass

import pytest

from kvstore.backends import backend_class
from kvstore.cli.main import main
from kvstore.errors import BackendUnavailable
from kvstore.testing.conformance import CASES, ConformanceRun, check
from kvstore.testing.conformance.plugin import record_cell


@dataclass(frozen=True)
class Target:
    id: str
    backend: str
    server: str = ""  # "" for memory and file
    style: str = "path"  # "path", "virtual" or "s3express"


S3_SERVERS = (("moto", "path"), ("moto", "virtual"), ("seaweedfs", "path"), ("ceph", "path"), ("s3rver", "path"))
TARGETS = [Target("memory", "memory"), Target("file", "file")]
for _backend in ("crt", "obstore", "fsspec"):
    for _server, _style in S3_SERVERS:
        _name = f"{_backend}-{_server}" + (f"-{_style}" if _server == "moto" else "")
        TARGETS.append(Target(_name, _backend, _server, _style))
# S3 Express: the test gateway (CreateSession + session auth) in front of moto.
TARGETS += [Target(f"{b}-s3express", b, "moto", "s3express") for b in ("crt", "obstore", "fsspec")]


def _backend_missing(name: str) -> str | None:
    from kvstore import plugins

    if name not in plugins.installed():
        return f"the {name} backend is not installed (installed: {', '.join(sorted(plugins.installed()))})"
    try:
        backend_class(name)
    except BackendUnavailable as exc:
        return str(exc)
    return None


def _server(s3_servers, name: str):
    """The named loopback server, or a skip when the server harness is not there."""
    if importlib.util.find_spec("kvstore.testing.servers") is None:
        pytest.skip("the loopback S3 servers (kvstore.testing.servers) are not part of this build")
    return s3_servers.get(name)


class Targets:
    """Opens each target's factory (and its bucket) on first use; removes them at the end."""

    def __init__(self, s3_servers, tmp_path_factory) -> None:
        self._servers = s3_servers
        self._tmp = tmp_path_factory
        self._open: dict[str, ConformanceRun | str] = {}  # a factory, or why the target is skipped
        self._undo: list = []

    def factory(self, target: Target) -> ConformanceRun:
        if target.id not in self._open:
            try:
                self._open[target.id] = self._start(target)
            except pytest.skip.Exception as exc:
                self._open[target.id] = str(exc)
        found = self._open[target.id]
        if isinstance(found, str):
            pytest.skip(found)
        return found

    def _start(self, target: Target) -> ConformanceRun:
        missing = _backend_missing(target.backend)
        if missing:
            if os.environ.get("CI"):  # make test installs every backend: a missing one is a broken build
                pytest.fail(missing)
            pytest.skip(missing)
        if target.backend == "memory":
            return self._track(ConformanceRun(f"memory://conformance-{uuid.uuid4().hex[:8]}"))
        if target.backend == "file":
            return self._track(ConformanceRun(f"file://{self._tmp.mktemp('conformance')}/root"))
        server = _server(self._servers, target.server)
        extra = {"kvstore_backend": target.backend}
        if target.style == "s3express":
            return self._s3express(server, extra)
        if target.style == "virtual":
            from kvstore.testing.servers import virtual_hosting_works

            if not virtual_hosting_works():
                pytest.skip("virtual-hosted names (bucket.localhost) do not resolve on this machine")
            extra.update(s3_addressing_style="virtual", s3_endpoint_url=f"http://localhost:{server.port}")
        from kvstore.testing.servers import limit_skips

        bucket = f"conformance-{uuid.uuid4().hex[:12]}"
        server.create_bucket(bucket)
        self._undo.append(lambda: server.delete_bucket(bucket))
        return self._track(ConformanceRun(server.url(bucket, "cf"), {**server.extra_config(), **extra},
                                          skips=limit_skips(target.server)))

    def _s3express(self, server, extra: dict) -> ConformanceRun:
        from kvstore.testing.s3express_gateway import S3ExpressGateway
        from kvstore.testing.tls import ThrowawayCA

        bucket = f"cf{uuid.uuid4().hex[:8]}--use1-az4--x-s3"
        server.create_bucket(bucket)
        self._undo.append(lambda: server.delete_bucket(bucket))
        zonal = extra["kvstore_backend"] != "crt"
        gateway = S3ExpressGateway(server.endpoint, server.access_key, server.secret_key, bucket=bucket,
                                   region="us-east-1", ca=ThrowawayCA(self._tmp.mktemp("ca")) if zonal else None).start()
        self._undo.append(gateway.stop)
        keys = {"aws_access_key_id": server.access_key, "aws_secret_access_key": server.secret_key}
        if zonal:
            # obstore and botocore go to AWS's zonal host themselves: the real s3express profile, with
            # the gateway as their HTTPS proxy and the gateway's CA trusted.
            config = {**keys, **extra, "s3_proxy_url": gateway.proxy_url, "s3_ca_bundle": gateway.ca_file}
        else:
            # The s3express profile insists on TLS; the CRT talks plain HTTP to the gateway, so the
            # generic s3 profile with session auth switched on stands in for it.
            config = {**server.extra_config(), **extra, "s3_endpoint_url": gateway.endpoint,
                      "s3_enable_s3express": "true", "kvstore_profile": "s3"}
        return self._track(ConformanceRun(f"s3://{bucket}/cf", config))

    def _track(self, factory: ConformanceRun) -> ConformanceRun:
        self._undo.append(factory.cleanup)
        return factory

    def close(self) -> None:
        for undo in reversed(self._undo):
            undo()


@pytest.fixture(scope="module")
def targets(s3_servers, tmp_path_factory):
    pool = Targets(s3_servers, tmp_path_factory)
    yield pool
    pool.close()


@pytest.mark.servers
@pytest.mark.parametrize(
    ("target", "case"),
    [pytest.param(t, c, id=f"{t.id}-{c.id}") for t in TARGETS for c in CASES],
)
def test_conformance(target, case, targets, request):
    record_cell(request.node, target.id, case.id)
    check(case, targets.factory(target))


# -- the CLI -------------------------------------------------------------------------------------
def test_cli_passes_on_a_good_store(tmp_path, capsys):
    code = main(["conformance", f"file://{tmp_path}/store", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "size-64mib" in out and "0 failed" in out
    assert re.search(r"^error-auth +skip ", out, re.M)  # a skip says so, with its reason
    assert "S3 stores only" in out


@pytest.mark.servers
@pytest.mark.parametrize("server", ["moto", "seaweedfs", "ceph", "s3rver"])
def test_cli_passes_on_each_server(server, s3_servers, unique_name, capsys):
    from kvstore.testing.servers import limit_skips

    s3 = _server(s3_servers, server)
    bucket = unique_name("cli")
    s3.create_bucket(bucket)
    try:
        sets = [f"--set={k}={v}" for k, v in s3.extra_config().items()]
        quick = [c for c in ("size-1b", "size-part-plus-1", "list-prefixes", "batch-mixed", "key-unicode", "metadata",
                             "error-auth", "error-missing-bucket", "integrity-altered") if c not in limit_skips(server)]
        code = main(["conformance", s3.url(bucket, "p"), *sets, *(f"-k={c}" for c in quick)])
        out = capsys.readouterr().out
        assert code == 0, out
        assert f"{len(quick)} passed, 0 failed" in out
        assert s3.secret_key not in out
    finally:
        s3.delete_bucket(bucket)


def test_declared_skips_skip_with_their_reason(tmp_path):
    """A case the factory declares its server cannot pass is skipped with the reason, not run."""
    from kvstore.testing.conformance import case_by_id, run_case

    ran = []
    factory = ConformanceRun(f"file://{tmp_path}/store", skips={"size-1b": "the server has no one-byte objects"})
    probe = type(case_by_id("size-1b"))("size-1b", lambda f: ran.append(f), "probe")
    result = run_case(probe, factory)
    assert (result.outcome, result.detail) == ("skip", "the server has no one-byte objects")
    with pytest.raises(pytest.skip.Exception, match="no one-byte objects"):
        check(probe, factory)
    assert ran == []
    assert run_case(case_by_id("size-empty"), factory).outcome == "pass"  # the others still run
    factory.cleanup()


def test_error_cases_name_each_call_that_misbehaves():
    """The read-error cases check every read call, sync and async, and name each one that does
    not raise (a memory store "with a wrong secret" just misses)."""
    import kvstore
    from kvstore.errors import AuthError
    from kvstore.testing.conformance.errors import _expect_all, _expect_all_async, _sync_reads

    with kvstore.open(f"memory://errors-{uuid.uuid4().hex[:8]}") as store:
        with pytest.raises(AssertionError) as sync:
            _expect_all(AuthError, _sync_reads(store), "here")
        with pytest.raises(AssertionError) as asynchronous:
            _expect_all_async(AuthError, store, "here")
    for name in ("get_into", "exists", "stat", "exists_many", "list"):
        assert f"{name}: nothing was raised" in str(sync.value)
    for name in ("aget", "aget_into", "aexists", "astat", "aexists_many", "alist"):
        assert f"{name}: nothing was raised" in str(asynchronous.value)
    assert "exists: nothing was raised (returned False)" in str(sync.value)


@pytest.mark.servers
def test_cli_fails_on_a_corrupting_endpoint(s3_servers, unique_name, capsys):
    """Bytes flipped in response bodies: the failing cases are named and the exit code is 1."""
    from kvstore.testing.faults import FaultProxy

    moto = _server(s3_servers, "moto")
    bucket = unique_name("corrupt")
    moto.create_bucket(bucket)
    try:
        with FaultProxy(moto.port) as proxy:
            proxy.corrupt()
            extra = moto.extra_config(s3_endpoint_url=proxy.endpoint)
            sets = [f"--set={k}={v}" for k, v in extra.items()]
            cases = [f"-k={c}" for c in ("size-1b", "size-part-plus-1", "get-into-buffers", "batch-mixed")]
            code = main(["conformance", moto.url(bucket, "p"), *sets, *cases])
        captured = capsys.readouterr()
        assert code == 1, captured.out
        failing = captured.err.split("failing cases:", 1)[1].split()
        assert {"size-1b", "size-part-plus-1", "get-into-buffers"} <= set(failing), captured.out
    finally:
        moto.delete_bucket(bucket)
