"""Secrets never echo: not in messages, reprs, JSON, logs, generated configs, whichever way they came in."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from urllib.parse import quote

import pytest

import kvstore
from kvstore.cli.main import main
from kvstore.errors import ConfigError, KVStoreError

MARKER = "kvMARKERs3cr3tQ9"  # never a substring of anything kvstore prints on its own
AKID = "AKIAMARKERKEYID0001"


def r(url, extra=None, env=None):
    return kvstore.resolve(url, extra, env=env or {})


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def chain_text(exc: BaseException) -> str:
    parts, link = [], exc
    while link is not None:
        parts += [str(link), repr(link)]
        link = link.__cause__ or link.__context__
    return "\n".join(parts)


# -- userinfo in an endpoint is refused, without quoting it ---------------------------------------
@pytest.mark.parametrize("endpoint", [f"http://admin:{MARKER}@127.0.0.1:9000", f"http://admin:{MARKER}@minio.local",
                                      f"https://{MARKER}@host:9000", f"http://admin:{MARKER}/x@host:9000"])
def test_endpoint_userinfo_is_refused(endpoint, capsys):
    with pytest.raises(ConfigError) as info:
        r("s3://b12", {"s3_endpoint_url": endpoint})
    assert "credentials" in str(info.value) and MARKER not in chain_text(info.value)
    with pytest.raises(ConfigError) as info:
        r("s3://b12", env={"AWS_ENDPOINT_URL": endpoint})
    assert info.value.key == "AWS_ENDPOINT_URL" and MARKER not in chain_text(info.value)
    for argv in (["resolve", "s3://b12"], ["resolve", "s3://b12", "--json"], ["lmcache-config", "s3://b12"],
                 ["lmcache-config", "s3://b12", "--mode", "mp"]):
        code, text = run_cli(capsys, *argv, f"--set=s3_endpoint_url={endpoint}")
        assert code == 2 and MARKER not in text, (argv, text)


# -- malformed URLs, bad ports and mistyped values never quote a secret ---------------------------
@pytest.mark.parametrize("url", [
    f"s3://{AKID}:{MARKER}@127.0.0.1:99999/b12", f"s3://{AKID}:{MARKER}@127.0.0.1:9000/b12",
    f"s3://{AKID}:{MARKER}/x@127.0.0.1:9000/b12", f"s3://{AKID}:1234/{MARKER}@127.0.0.1:9000/b12",
    f"http://{AKID}:{MARKER}@host:abc/b12", f"minio://{AKID}:{MARKER}@host:9000/b12", f"s3://{AKID}:{MARKER}@b12",
    f"s3://{AKID}:{MARKER}@b12\n",
])
def test_urls_with_credentials_never_echo(url, capsys):
    with pytest.raises(ConfigError) as info:
        r(url, {"s3_region": "x"})
    assert MARKER not in chain_text(info.value) and AKID not in chain_text(info.value)
    for argv in (["ls", url], ["resolve", url, "--json"], ["stat", url, "k"]):
        code, text = run_cli(capsys, *argv)
        assert code == 2 and MARKER not in text and AKID not in text, text


@pytest.mark.parametrize("key,value", [("aws_secret_access_key", 123456789012345678),
                                       ("aws_secret_access_key", [MARKER]), ("aws_session_token", {"t": MARKER}),
                                       ("aws_access_key_id", 98765432109876)])
def test_mistyped_secret_values_are_not_quoted(key, value, tmp_path, capsys):
    extra = {"s3_region": "x", "aws_access_key_id": AKID, "aws_secret_access_key": MARKER, key: value}
    with pytest.raises(ConfigError) as info:
        r("s3://b12", extra)
    shown = str(value) if not isinstance(value, (list, dict)) else MARKER
    assert info.value.key == key and shown not in chain_text(info.value)
    path = tmp_path / "lmcache.yaml"
    path.write_text(json.dumps({"remote_url": "s3://b12", "extra_config": extra}))
    code, text = run_cli(capsys, "resolve", "-", "-c", str(path))
    assert code == 2 and shown not in text and key in text


# -- -vv: kvstore's loggers only --------------------------------------------------------------------
@pytest.mark.servers
def test_vv_leaves_other_libraries_at_warning(s3_servers, unique_name):
    """Run as a user would (a fresh process): botocore's DEBUG log carries request headers."""
    moto = s3_servers.get("moto")
    bucket = unique_name("vv")
    moto.create_bucket(bucket)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": moto.access_key, "AWS_SECRET_ACCESS_KEY": moto.secret_key}
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)
    argv = [sys.executable, "-m", "kvstore.cli.main", "-vv", "ls", f"http://127.0.0.1:{moto.port}/{bucket}",
            "--set=s3_region=us-east-1", "--set=kvstore_backend=fsspec"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert moto.secret_key not in done.stdout + done.stderr
    assert moto.access_key not in done.stderr and "Authorization" not in done.stderr
    assert not [line for line in done.stderr.splitlines() if line.startswith("DEBUG") and " kvstore" not in line]
    asked = subprocess.run([*argv[:3], "--log-level=botocore=DEBUG", *argv[3:]], env=env, capture_output=True,
                           text=True, timeout=60)
    assert asked.returncode == 0 and "DEBUG botocore" in asked.stderr  # only when asked for


def test_log_level_option_is_checked(capsys):
    assert main(["--log-level=botocore", "resolve", "memory://x"]) == 2
    assert "LOGGER=LEVEL" in capsys.readouterr().err


# -- one marker through every input path, looked for in every output ------------------------------
def _inputs(tmp_path):
    """(label, url, extra_config, env, config-file text or None) that resolve with MARKER inside."""
    proxy = f"http://user:{quote(MARKER, safe='')}@proxy.internal:3128"
    config_file = tmp_path / "lmcache.yaml"
    config_file.write_text(json.dumps({"remote_url": "s3://b12/kv", "extra_config": {
        "s3_region": "us-east-1", "aws_access_key_id": AKID, "aws_secret_access_key": MARKER,
        "aws_session_token": MARKER + "tok"}}))
    return [
        ("extra_config", "s3://b12/kv", {"s3_region": "us-east-1", "aws_access_key_id": AKID,
                                         "aws_secret_access_key": MARKER, "aws_session_token": MARKER + "tok"}, {}, None),
        ("env", "s3://b12/kv", {"s3_region": "us-east-1"},
         {"AWS_ACCESS_KEY_ID": AKID, "AWS_SECRET_ACCESS_KEY": MARKER, "AWS_SESSION_TOKEN": MARKER + "tok"}, None),
        ("config file", "-", {}, {}, str(config_file)),
        ("proxy url", "s3://b12/kv", {"s3_region": "us-east-1", "kvstore_backend": "obstore", "s3_proxy_url": proxy}, {},
         None),
    ]


def test_marker_secret_appears_in_no_output(tmp_path, capsys, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG, logger="kvstore")
    for label, url, extra, env, path in _inputs(tmp_path):
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        file_args = ["-c", path] if path else []
        sets = [f"--set={k}={v}" for k, v in extra.items()]
        from kvstore.cli.common import load_extra_config

        config = kvstore.resolve(None if url == "-" else url, load_extra_config(path, []) if path else extra)
        assert config.credentials.source != "none" or "proxy" in label
        texts = [repr(config), str(config), repr(config.credentials), json.dumps(config.as_dict(), default=str),
                 str(config.rows()), f"{config}"]
        for argv in (["resolve", url], ["resolve", url, "--json"], ["-v", "resolve", url],
                     ["lmcache-config", url], ["lmcache-config", url, "--mode", "mp"]):
            code, text = run_cli(capsys, *argv, *file_args, *sets)
            assert code == 0, (label, argv, text)
            texts.append(text)
        for text in texts:
            assert MARKER not in text and quote(MARKER, safe="") not in text, (label, text)
    # URLs and endpoint URLs that carry it are refused, and say nothing of it.
    for url, extra in ((f"s3://{AKID}:{MARKER}@127.0.0.1:9000/b12", {}),
                       ("s3://b12", {"s3_endpoint_url": f"http://a:{MARKER}@127.0.0.1:9000"}),
                       ("s3://b12", {"kvstore_backend": "obstore", "s3_proxy_url": f"http://a:{MARKER}/x@proxy:1"})):
        for argv in (["resolve", url], ["ls", url], ["lmcache-config", url]):
            code, text = run_cli(capsys, *argv, *(f"--set={k}={v}" for k, v in extra.items()))
            assert code == 2 and MARKER not in text, text
    assert MARKER not in caplog.text


@pytest.mark.servers
@pytest.mark.parametrize("backend", ["crt", "obstore", "fsspec"])
def test_marker_secret_rejected_by_a_real_server_is_not_echoed(backend, s3_servers, unique_name, caplog):
    """A wrong secret that reaches moto: the AuthError, its causes and kvstore's DEBUG log never quote it."""
    moto = s3_servers.get("moto")
    bucket = unique_name("sec")
    moto.create_bucket(bucket)
    caplog.set_level(logging.DEBUG, logger="kvstore")
    extra = moto.extra_config(kvstore_backend=backend, aws_secret_access_key=MARKER, kvstore_max_retries=0,
                              kvstore_timeout_s=10)
    with kvstore.open(moto.url(bucket, "p"), extra) as store:
        texts = [repr(store)]
        for call in (lambda: store.put("k", b"x"), lambda: store.get("k"), lambda: list(store.list(""))):
            with pytest.raises(KVStoreError) as info:
                call()
            texts.append(chain_text(info.value))
    for text in texts + [caplog.text]:
        assert MARKER not in text, text
