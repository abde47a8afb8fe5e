"""``kvstore bench`` end to end against the null endpoint, and the null endpoint's S3 answers."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from kvstore.bench.null_endpoint import LABEL, NullEndpoint, payload
from kvstore.cli.main import main


@pytest.fixture(scope="module")
def null_endpoint():
    with NullEndpoint() as endpoint:
        yield endpoint


def test_bench_against_the_null_endpoint_writes_every_contender(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main([
        "bench", "--server", "null", "--size", "1MiB", "--count", "4", "--concurrency", "2", "--rounds", "1",
        "--ops", "put,get,get_into,exists", "--backends", "crt", "--baselines", "awscrt,obstore", "--quiet",
        "--json", str(out),
    ])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["endpoint_label"] == LABEL
    assert data["limits"]["tcp_one_stream"] > 0 and data["limits"]["memcpy"] > 0
    by = {(r["contender"], r["op"]): r for r in data["results"]}
    assert {c for c, _ in by} == {"kvstore-crt", "kvstore-crt-async", "awscrt", "obstore"}  # both APIs by default
    for (contender, op), r in by.items():
        assert r["status"] == "ok", (contender, op, r["status"])
        assert r["ops_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
        if op != "exists":
            assert r["gib_per_s"] > 0 and r["cpu_s_per_gib"] > 0
            # measured from the endpoint's process (too few bytes here for /proc's 10 ms ticks to show much)
            assert r["server_cpu_s_per_gib"] is not None and r["server_cpu_s_per_gib"] >= 0
    assert data["cores"] >= 1
    assert any(t["target"].startswith("kvstore-crt / awscrt") and t["value"] for t in data["targets"])
    printed = capsys.readouterr().out
    assert "kvstore-crt" in printed and "not a storage server" in printed
    # each moving op as a share of this run's loopback TCP limit
    r = by[("kvstore-crt", "get_into")]
    share = f"{r['gib_per_s'] * (1 << 30) / data['limits']['tcp_concurrent']:.0%}"
    row = next(line.split() for line in printed.splitlines() if line.split()[:2] == ["kvstore-crt", "get_into"])
    assert row[3] == share and data["fraction_of_limits"]["kvstore-crt get_into"] > 0


def test_reads_alone_find_objects_written_for_them(tmp_path):
    """Ops given in any order, put absent: the objects are written first, unmeasured, and then read."""
    out = tmp_path / "bench.json"
    code = main([
        "bench", "--server", "null", "--size", "256KiB", "--count", "3", "--concurrency", "2", "--rounds", "1",
        "--ops", "exists,get_into", "--backends", "crt", "--baselines", "awscrt", "--api", "sync", "--quiet",
        "--json", str(out),
    ])
    assert code == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["contender"], r["op"]) for r in results] == [
        ("kvstore-crt", "get_into"), ("kvstore-crt", "exists"), ("awscrt", "get_into"), ("awscrt", "exists")]
    assert all(r["status"] == "ok" and r["ops_per_s"] > 0 for r in results), results


def test_process_cpu_seconds_counts_a_busy_child_and_forgets_a_dead_one():
    from kvstore.bench.runner import process_cpu_seconds

    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.3\n"
                                                    "while time.process_time() < end: pass\ninput()"],
                             stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while process_cpu_seconds([child.pid]) < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 0.25 <= process_cpu_seconds([child.pid]) < 5
    finally:
        child.communicate(b"\n", timeout=10)
    assert process_cpu_seconds([child.pid]) == 0.0


def test_unknown_contender_is_a_usage_error(capsys):
    assert main(["bench", "--server", "null", "--backends", "nope", "--quiet"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err
    assert main(["bench", "--server", "null", "--api", "sync,threads", "--quiet"]) == 2
    assert "unknown API threads" in capsys.readouterr().err


def test_null_endpoint_serves_ranges_heads_and_lists(null_endpoint):
    import boto3

    client = boto3.client(
        "s3", endpoint_url=null_endpoint.endpoint, region_name=null_endpoint.region,
        aws_access_key_id=null_endpoint.access_key, aws_secret_access_key=null_endpoint.secret_key,
    )
    size = 100_000
    client.put_object(Bucket="b", Key="dir/obj", Body=payload(size), Metadata={"kind": "chunk"})

    ranged = client.get_object(Bucket="b", Key="dir/obj", Range="bytes=1000-1999")
    assert ranged["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert ranged["ContentRange"] == f"bytes 1000-1999/{size}"
    assert ranged["Body"].read() == payload(size)[1000:2000]

    tail = client.get_object(Bucket="b", Key="dir/obj", Range="bytes=-10")
    assert tail["Body"].read() == payload(size)[-10:]

    head = client.head_object(Bucket="b", Key="dir/obj")
    assert head["ContentLength"] == size and head["Metadata"] == {"kind": "chunk"}

    assert client.get_object(Bucket="b", Key="dir/obj")["Body"].read() == payload(size)
    listed = client.list_objects_v2(Bucket="b", Prefix="dir/")
    assert [(o["Key"], o["Size"]) for o in listed["Contents"]] == [("dir/obj", size)]

    with pytest.raises(client.exceptions.NoSuchKey):
        client.get_object(Bucket="b", Key="dir/missing")


@pytest.mark.slow  # a bench per backend and raw client, each in a process of its own
def test_a_bench_of_every_backend_and_client_ends_without_asyncio_or_thread_complaints():
    """Run in a process of its own: a task left pending or a loop closed under a client prints at exit."""
    argv = ["bench", "--server", "null", "--size", "1MiB", "--count", "4", "--concurrency", "2", "--rounds", "1",
            "--ops", "put,get,get_into", "--backends", "crt,obstore,fsspec", "--baselines", "awscrt,obstore,s3fs",
            "--quiet"]
    result = subprocess.run([sys.executable, "-X", "dev", "-c", "import sys; from kvstore.cli.main import main; "
                             "sys.exit(main(sys.argv[1:]))", *argv], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    for complaint in ("Task was destroyed", "Event loop is closed", "was never awaited", "Exception ignored",
                      "Unclosed", "Traceback"):
        assert complaint not in result.stderr, result.stderr


def test_thread_count_with_reads_in_flight_is_measured_per_backend():
    """``python -m kvstore.bench.threads`` reads through both APIs (it checks every size) and
    reports the threads of a process that held one backend only."""
    done = subprocess.run([sys.executable, "-m", "kvstore.bench.threads", "--inflight", "16", "--size", "64KiB",
                            "--backends", "crt"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert row["backend"] == "crt" and row["inflight"] == 16
    assert row["before_open"] < row["open"] <= max(row["peak_async"], row["peak_sync"])
