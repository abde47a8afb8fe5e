"""``kvstore check``: one probe object written, read back, stat'ed, listed and deleted on real moto."""

from __future__ import annotations

import json

import pytest
import yaml

from kvstore.check import probe
from kvstore.cli.main import main
from kvstore.testing.faults import FaultProxy

pytestmark = pytest.mark.servers


@pytest.fixture
def moto(s3_servers):
    return s3_servers.get("moto")


@pytest.fixture
def bucket(moto, unique_name):
    name = unique_name("chk")
    moto.create_bucket(name)
    return name


def objects(moto, bucket: str) -> list[str]:
    listing = moto.client().list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in listing.get("Contents", [])]


def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def check(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = main(["check", *argv])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def line_of(lines: list[str], step: str) -> str:
    return next(line for line in lines if line.split()[0] == step)


def test_every_step_passes_and_nothing_is_left(capsys, tmp_path, moto, bucket):
    extra = write_yaml(tmp_path / "extra.yaml", moto.extra_config())
    code, lines, _ = check(capsys, moto.url(bucket, "kv"), "-c", extra)
    assert code == 0, lines
    assert [line.split()[:2] for line in lines[:7]] == [[s, "ok"] for s in ("resolve", "connect", "write", "read", "stat", "list", "delete")]
    assert lines[-1].startswith("all 7 steps passed")
    assert objects(moto, bucket) == []
    assert moto.secret_key not in "\n".join(lines)


def test_missing_bucket_is_a_store_error_on_the_connect_step(capsys, tmp_path, moto, unique_name):
    missing = unique_name("nobucket")
    extra = write_yaml(tmp_path / "extra.yaml", moto.extra_config())
    code, lines, _ = check(capsys, moto.url(missing), "-c", extra)
    assert code == 3, lines
    connect = line_of(lines, "connect")
    assert "FAIL" in connect and "BucketNotFound" in connect and missing in connect
    assert line_of(lines, "write").split()[1] == "skipped"
    assert lines[-1].startswith("failed at connect")


def test_wrong_secret_is_an_auth_error_and_is_never_shown(capsys, tmp_path, moto, bucket):
    extra = write_yaml(tmp_path / "extra.yaml", moto.extra_config(aws_secret_access_key="wrong-secret-value"))
    code, lines, err = check(capsys, moto.url(bucket), "-c", extra, "--json")
    assert code == 3
    report = json.loads("\n".join(lines))
    failed = [s for s in report["steps"] if s["status"] == "fail"]
    assert [(s["step"], s["error"]) for s in failed] == [("connect", "AuthError")]
    assert "wrong-secret-value" not in "\n".join(lines) + err
    assert objects(moto, bucket) == []


def test_config_typo_is_exit_2_with_a_suggestion(capsys, moto, bucket):
    code, lines, _ = check(capsys, moto.url(bucket), "--set", "s3_regoin=us-east-1")
    assert code == 2
    resolve = line_of(lines, "resolve")
    assert "ConfigError" in resolve and "s3_region" in resolve
    assert all(line.split()[1] == "skipped" for line in lines[1:7])


def test_unreadable_config_file_is_exit_2(capsys, tmp_path):
    bad = tmp_path / "lmcache.yaml"
    bad.write_text("chunk_size: [unclosed\n")
    code, lines, _ = check(capsys, "-c", str(bad), "--json")
    assert code == 2
    assert json.loads("\n".join(lines))["steps"][0]["error"] == "ConfigError"


def test_full_lmcache_file_is_checked_as_the_engine_would_use_it(capsys, tmp_path, moto, bucket):
    lmcache_file = write_yaml(tmp_path / "lmcache.yaml", {
        "chunk_size": 64, "local_cpu": False, "max_local_cpu_size": 50, "save_unfull_chunk": False,
        "remote_serde": "naive", "blocking_timeout_secs": 10, "remote_storage_plugins": ["kvstore"],
        "extra_config": {
            "remote_storage_plugin.kvstore.module_path": "kvstore.lmcache",
            "remote_storage_plugin.kvstore.class_name": "KVStoreConnectorAdapter",
            "kvstore_url": moto.url(bucket, "kv"), "save_chunk_meta": False, **moto.extra_config(),
        },
    })
    code, lines, err = check(capsys, "-c", lmcache_file, "--json")
    assert code == 0, lines
    report = json.loads("\n".join(lines))
    assert report["ok"] and report["store"] == f"s3://{bucket}/kv" and err == ""
    assert objects(moto, bucket) == []


def test_remote_url_of_an_lmcache_file_names_the_store(capsys, tmp_path, moto, bucket):
    lmcache_file = write_yaml(tmp_path / "lmcache.yaml", {
        "chunk_size": 256, "remote_url": moto.url(bucket), "extra_config": moto.extra_config()})
    code, lines, err = check(capsys, "-c", lmcache_file)
    assert code == 0, lines
    assert "LMCache's own connector serves it" in err  # the probe is not what the engine runs


def test_misplaced_eviction_in_an_l2_spec_is_a_config_error(capsys, tmp_path, moto, bucket):
    spec = {"type": "plugin", "module_path": "kvstore.lmcache.l2", "class_name": "KVStoreL2Adapter",
            "adapter_params": {"kvstore_url": moto.url(bucket), **moto.extra_config(), "eviction": {"eviction_policy": "LRU"}}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    code, lines, _ = check(capsys, "-c", str(path))
    assert code == 2
    assert "top level" in line_of(lines, "resolve")


def test_object_is_removed_when_a_later_step_fails(moto, bucket):
    with FaultProxy(moto.port) as proxy:
        extra = moto.extra_config(s3_endpoint_url=proxy.endpoint, kvstore_max_retries=0)

        def fail_read(step: str) -> None:
            if step == "read":
                proxy.error(500, count=1)

        report = probe(moto.url(bucket), extra, before_step=fail_read)
    by_step = {s.step: s for s in report.steps}
    assert report.exit_code == 3
    assert by_step["write"].status == "ok" and by_step["read"].status == "fail"
    assert by_step["stat"].status == "skipped" and by_step["cleanup"].status == "ok"
    assert objects(moto, bucket) == []


@pytest.mark.parametrize("checksum", ["crc32c", "none"])
def test_read_back_that_differs_is_exit_1_and_still_cleaned_up(moto, bucket, checksum):
    with FaultProxy(moto.port) as proxy:
        extra = moto.extra_config(s3_endpoint_url=proxy.endpoint, kvstore_max_retries=0, kvstore_checksum=checksum)

        def corrupt_read(step: str) -> None:
            if step == "read":
                proxy.corrupt(count=1)

        report = probe(moto.url(bucket), extra, before_step=corrupt_read)
    by_step = {s.step: s for s in report.steps}
    assert report.exit_code == 1, report.lines()
    assert by_step["read"].status == "fail"
    assert by_step["read"].error == ("IntegrityError" if checksum == "crc32c" else "WrongAnswer")
    assert by_step["delete"].status == "ok"
    assert objects(moto, bucket) == []


def test_a_url_that_names_another_store_than_the_file_is_exit_2(capsys, tmp_path):
    # As for every other command: check once warned, then probed the command line's store.
    path = tmp_path / "lmcache.yaml"
    path.write_text("remote_url: memory://from-the-file\n")
    assert main(["check", "memory://on-the-command-line", "-c", str(path)]) == 2
    out = capsys.readouterr().out
    assert "name different stores" in out
    assert main(["check", "memory://from-the-file", "-c", str(path)]) == 0
