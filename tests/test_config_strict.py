"""Strict configuration: other tools' keys, malformed URLs, zone/region conflicts, config files, the CLI's shape."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import kvstore
from kvstore.cli.main import main
from kvstore.config import keys as K
from kvstore.errors import ConfigError

SEEDS = Path("/work/shared/reference/seeds")
TLS_HINT = "the endpoint may not speak TLS: use http:// or disable_tls"
MAX_IO_THREADS = 512  # documented in docs/configuration.md


def r(url, extra=None, env=None):
    return kvstore.resolve(url, extra, env=env or {})


# -- keys other tools spell differently never send data somewhere else --------------------------
@pytest.mark.parametrize("name,value,target", [
    ("endpoint", "http://127.0.0.1:9000", "s3_endpoint_url"),
    ("endpoint_url", "http://127.0.0.1:9000", "s3_endpoint_url"),
    ("aws_endpoint_url", "http://127.0.0.1:9000", "s3_endpoint_url"),
    ("access_key", "AKIAEXAMPLE", "aws_access_key_id"),
    ("secret_key", "s3cr3t", "aws_secret_access_key"),
    ("region", "eu-west-1", "s3_region"),
    ("aws_region", "eu-west-1", "s3_region"),
    ("region_name", "eu-west-1", "s3_region"),
    ("bucket", "other-bucket", "kvstore_url"),
    ("secure", "false", "disable_tls"),
    ("allow_http", "true", "disable_tls"),
    ("virtual_hosted_style_request", "true", "s3_addressing_style"),
    ("token", "FwoGZXIvYXdzEXAMPLETOKEN", "aws_session_token"),
])
def test_other_tools_keys_are_errors_naming_the_kvstore_key(name, value, target):
    with pytest.raises(ConfigError) as info:
        r("s3://b12", {"s3_region": "us-east-1", name: value})
    assert info.value.key == name and info.value.suggestion == target
    assert target in str(info.value)
    if K.BY_NAME[target].secret:
        assert value not in str(info.value)


def test_endpoint_key_no_longer_opens_aws(capsys):
    assert main(["resolve", "s3://b12", "--set", "endpoint=http://127.0.0.1:9000", "--set", "s3_region=x"]) == 2
    err = capsys.readouterr().err
    assert "s3_endpoint_url" in err and "amazonaws" not in err


def test_aws_endpoint_url_env_is_honoured_with_its_name_as_provenance(capsys, monkeypatch):
    c = r("s3://b12", env={"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000", "AWS_ENDPOINT_URL": "http://10.0.0.1:1"})
    assert (c.endpoint, c.source_of("endpoint")) == ("http://127.0.0.1:9000", "env:AWS_ENDPOINT_URL_S3")
    c = r("s3://b12", env={"AWS_ENDPOINT_URL": "http://10.0.0.1:7480"})
    assert (c.endpoint, c.source_of("endpoint")) == ("http://10.0.0.1:7480", "env:AWS_ENDPOINT_URL")
    # The SDKs' switch that turns both variables off.
    c = r("s3://b12", {"s3_region": "x"}, env={"AWS_ENDPOINT_URL": "http://10.0.0.1:7480",
                                                 "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"})
    assert c.profile == "aws" and "amazonaws.com" in c.endpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    assert main(["resolve", "s3://b12", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["endpoint"] == {"value": "http://127.0.0.1:9000", "source": "env:AWS_ENDPOINT_URL_S3"}


@pytest.mark.parametrize("value", ["http://127.0.0.1:99999", "ftp://h:1", "http://h:1/bucket", "127.0.0.1:9000"])
def test_malformed_endpoint_urls(value):
    with pytest.raises(ConfigError) as info:
        r("s3://b12", {"s3_endpoint_url": value})
    assert info.value.key == "s3_endpoint_url"
    with pytest.raises(ConfigError):
        r("s3://b12", env={"AWS_ENDPOINT_URL": value})


# -- did-you-mean points to the key that was meant ----------------------------------------------
def test_lmcache_port_storage_backend_block_points_to_remote_url(tmp_path, capsys):
    text = (SEEDS / "000_ed7f987191a376fe.txt").read_text() if SEEDS.exists() else ""
    block = text[text.index("chunk_size: 256\nlocal_device"):text.index("region: \"us-west-2\"") + 20] if text else (
        'chunk_size: 256\nlocal_device: "cpu"\nstorage_backend:\n  type: "remote"\n  connector:\n    type: "s3"\n'
        '    bucket: "lmcache-kv-cache"\n    prefix: "models/qwen3-32b/"\n    region: "us-west-2"\n')
    path = tmp_path / "port.yaml"
    path.write_text(block)
    assert main(["resolve", "-", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "kvstore_backend" not in err
    assert "remote_url: s3://lmcache-kv-cache/models/qwen3-32b" in err and "s3_region: us-west-2" in err


@pytest.mark.parametrize("name,meant", [
    ("s3_regoin", "s3_region"), ("disable_tsl", "disable_tls"), ("blocking_timeout_sec", "blocking_timeout_secs"),
    ("save_chunk_metadata", "save_chunk_meta"), ("kvstore_time_out_s", "kvstore_timeout_s"),
])
def test_did_you_mean_is_the_nearest_key(name, meant):
    with pytest.raises(ConfigError) as info:
        r("memory://x", {name: "1"})
    assert info.value.suggestion == meant


def test_unrelated_lmcache_keys_with_shared_words_are_not_typos():
    c = r("memory://x", {"local_device": "cpu", "remote_serde": "naive", "chunk_size": 256, "nixl_backend": "x"})
    assert set(c.ignored_keys) == {"local_device", "remote_serde", "chunk_size", "nixl_backend"}


# -- malformed URLs are errors, and resolution never touches the disk ---------------------------
@pytest.mark.parametrize("url", ["s3:/bucket", "s3//bucket", "file:relative", "s3:bucket", "xyz://bucket/p",
                                 "http//host:9000/b"])
def test_malformed_scheme_is_a_config_error_and_creates_nothing(url, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError):
        r(url)
    for command in (["resolve", url], ["ls", url], ["get", url, "k"], ["stat", url, "k"]):
        assert main(command) == 2, command
        assert "ConfigError" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_resolving_a_file_store_creates_no_directory(tmp_path):
    target = tmp_path / "not" / "there"
    assert r(f"file://{target}").location == str(target)
    assert r(str(target)).location == str(target)
    assert not (tmp_path / "not").exists()


def test_fsspec_protocols_still_resolve():
    assert r("gs://bucket/p").profile == "fsspec"
    assert r("./s3:/x").profile == "file"  # a directory that happens to be named like a scheme


# -- S3 Express zone and region ----------------------------------------------------------------
def test_express_zone_outside_the_region_is_an_error():
    with pytest.raises(ConfigError) as info:
        r("s3://kv--usw2-az1--x-s3", {"s3_region": "us-east-1"})
    assert info.value.key == "s3_region" and "us-west-2" in str(info.value)
    with pytest.raises(ConfigError):
        r("s3://kv--usw2-az1--x-s3.s3express-usw2-az1.us-east-1.amazonaws.com")
    # The environment is below the URL: the zone's region wins over AWS_REGION.
    c = r("s3://kv--usw2-az1--x-s3", env={"AWS_REGION": "us-east-1"})
    assert (c.region, c.endpoint) == ("us-west-2", "https://kv--usw2-az1--x-s3.s3express-usw2-az1.us-west-2.amazonaws.com")
    assert r("s3://kv--usw2-az1--x-s3", {"s3_region": "us-west-2"}).region == "us-west-2"


# -- config files --------------------------------------------------------------------------------
@pytest.mark.parametrize("body", ["remote_url: s3://b12\nextra_config: [a, b]\n", "remote_url: s3://b12\nextra_config: text\n",
                                  "- a\n- b\n"])
def test_config_file_whose_extra_config_is_not_a_mapping(body, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(body)
    assert main(["resolve", "-", "-c", str(path)]) == 2
    assert "ConfigError" in capsys.readouterr().err


def test_url_on_the_command_line_and_remote_url_in_the_file(tmp_path, capsys):
    path = tmp_path / "lmcache.yaml"
    path.write_text("remote_url: s3://b12/kv\nextra_config:\n  s3_region: us-east-1\n")
    assert main(["resolve", "s3://b12/kv/", "-c", str(path), "--json"]) == 0  # the same store: fine
    assert json.loads(capsys.readouterr().out)["bucket"]["value"] == "b12"
    assert main(["resolve", "s3://other/kv", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "s3://other/kv" in err and "s3://b12/kv" in err and "remote_url" in err
    path.write_text("remote_url: s3://b12/kv\nextra_config:\n  kvstore_url: s3://b13\n  s3_region: us-east-1\n")
    assert main(["resolve", "-", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "s3://b12/kv" in err and "s3://b13" in err


# -- io threads ---------------------------------------------------------------------------------
def test_io_threads_have_a_documented_maximum():
    assert r("s3://b12", {"s3_region": "x", "s3_num_io_threads": 320}).io_threads == 320  # LMCache's CoreWeave config
    for key in ("s3_num_io_threads", "s3_max_io_concurrency"):
        with pytest.raises(ConfigError) as info:
            r("s3://b12", {"s3_region": "x", key: 2000})
        assert str(MAX_IO_THREADS) in str(info.value)
    assert f"at most {MAX_IO_THREADS}" in (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()


# -- the CLI ------------------------------------------------------------------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"kvstore {kvstore.__version__}"


def test_options_before_and_after_positionals(tmp_path, capsys):
    root = tmp_path / "store"
    with kvstore.open(f"file://{root}") as store:
        store.put("p/one", b"1")
        store.put("q/two", b"22")
    config = tmp_path / "c.yaml"
    config.write_text("kvstore_checksum: crc32c\n")
    url = f"file://{root}"
    for argv in (["ls", "--json", url, "p/"], ["ls", url, "--json", "p/"], ["ls", url, "p/", "--json"],
                 ["ls", "-c", str(config), url, "--json", "p/"], ["ls", url, "--set", "kvstore_fsync=false", "p/", "--json"],
                 ["ls", url, "-v", "p/", "--json"]):
        assert main(argv) == 0, argv
        assert [i["key"] for i in json.loads(capsys.readouterr().out)] == ["p/one"], argv
    assert main(["stat", url, "--json", "q/two"]) == 0
    assert json.loads(capsys.readouterr().out)["size"] == 2


@pytest.mark.servers
def test_tls_against_a_plain_http_endpoint_says_so(s3_servers, unique_name, capsys):
    moto = s3_servers.get("moto")
    bucket = unique_name("tls")
    moto.create_bucket(bucket)
    sets = [f"aws_access_key_id={moto.access_key}", f"aws_secret_access_key={moto.secret_key}", "s3_region=us-east-1",
            "kvstore_max_retries=0", "kvstore_timeout_s=5"]
    for backend in ("crt", "obstore", "fsspec"):
        argv = ["ls", f"s3://127.0.0.1:{moto.port}/{bucket}", *(f"--set={s}" for s in sets), f"--set=kvstore_backend={backend}"]
        assert main(argv) == 3
        err = capsys.readouterr().err
        assert err.count(TLS_HINT) == 1, err
    assert main([*argv, "--set=disable_tls=true"]) == 0  # the hint's advice works
    capsys.readouterr()


def test_other_errors_get_no_tls_hint(capsys):
    assert main(["ls", "s3://127.0.0.1:9/b12", "--set=disable_tls=yes_please"]) == 2
    assert TLS_HINT not in capsys.readouterr().err


def test_no_resolution_reads_the_disk_for_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir(tmp_path))
    assert r("data/kv").location == str(tmp_path / "data" / "kv")
    assert set(os.listdir(tmp_path)) == before
