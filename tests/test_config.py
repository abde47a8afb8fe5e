"""resolve(): the profile table, LMCache's documented configs, provenance, errors, fuzzing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvstore
from kvstore.cli.common import load_extra_config
from kvstore.config import LMCacheOptions
from kvstore.config import keys as K
from kvstore.errors import ConfigError

EXAMPLES = Path(__file__).parent / "data" / "lmcache_examples"


def r(url, extra=None, env=None):
    return kvstore.resolve(url, extra, env=env or {})


# (url, extra_config) -> profile, bucket, prefix, endpoint, addressing, tls, region
TABLE = [
    ("s3://my-bucket", {"s3_region": "us-east-1"},
     ("aws", "my-bucket", "", "https://my-bucket.s3.us-east-1.amazonaws.com", "virtual", True, "us-east-1")),
    ("s3://my-bucket/some/prefix", {"s3_region": "eu-west-1"},
     ("aws", "my-bucket", "some/prefix", "https://my-bucket.s3.eu-west-1.amazonaws.com", "virtual", True, "eu-west-1")),
    ("s3://my-bucket.s3.us-west-2.amazonaws.com/p", None,
     ("aws", "my-bucket", "p", "https://my-bucket.s3.us-west-2.amazonaws.com", "virtual", True, "us-west-2")),
    ("s3://kv--usw2-az1--x-s3.s3express-usw2-az1.us-west-2.amazonaws.com", {"s3_enable_s3express": "True"},
     ("s3express", "kv--usw2-az1--x-s3", "", "https://kv--usw2-az1--x-s3.s3express-usw2-az1.us-west-2.amazonaws.com",
      "virtual", True, "us-west-2")),
    ("s3://name--usw2-az1--x-s3", None,
     ("s3express", "name--usw2-az1--x-s3", "", "https://name--usw2-az1--x-s3.s3express-usw2-az1.us-west-2.amazonaws.com",
      "virtual", True, "us-west-2")),
    ("s3://test-127.cwlota.com", {"s3_region": "US-WEST-04A"},
     ("coreweave", "test-127", "", "http://test-127.cwlota.com", "virtual", False, "US-WEST-04A")),
    ("s3://bucket.cwobject.com", None,
     ("coreweave", "bucket", "", "https://bucket.cwobject.com", "virtual", True, "us-east-1")),
    ("s3://127.0.0.1:9000/bucket/prefix", {"disable_tls": "true"},
     ("minio", "bucket", "prefix", "http://127.0.0.1:9000", "path", False, "us-east-1")),
    ("http://minio.local:9000/bucket", None,
     ("minio", "bucket", "", "http://minio.local:9000", "path", False, "us-east-1")),
    ("https://minio.example.com/bucket/a/b", None,
     ("minio", "bucket", "a/b", "https://minio.example.com", "path", True, "us-east-1")),
    ("minio://host:9000/bucket", None,
     ("minio", "bucket", "", "http://host:9000", "path", False, "us-east-1")),
    ("s3://bucket/pre", {"s3_endpoint_url": "http://127.0.0.1:8333"},
     ("s3", "bucket", "pre", "http://127.0.0.1:8333", "path", False, "us-east-1")),
    ("s3://bucket/pre", {"s3_endpoint_url": "http://localhost:8333", "s3_addressing_style": "virtual"},
     ("s3", "bucket", "pre", "http://bucket.localhost:8333", "virtual", False, "us-east-1")),
    (None, {"s3_endpoint": "s3://my-bucket", "s3_region": "us-east-1"},
     ("aws", "my-bucket", "", "https://my-bucket.s3.us-east-1.amazonaws.com", "virtual", True, "us-east-1")),
    (None, {"s3_endpoint": "my-bucket.s3.us-east-1.amazonaws.com"},
     ("aws", "my-bucket", "", "https://my-bucket.s3.us-east-1.amazonaws.com", "virtual", True, "us-east-1")),
]


@pytest.mark.parametrize("url,extra,expected", TABLE, ids=[str(t[0] or t[1]["s3_endpoint"]) for t in TABLE])
def test_profile_table(url, extra, expected):
    c = r(url, extra)
    assert (c.profile, c.bucket, c.prefix, c.endpoint, c.addressing, c.tls, c.region) == expected
    assert c.backend == "crt"


@pytest.mark.parametrize("url,profile,backend", [
    ("file:///abs/dir", "file", "file"), ("/abs/dir", "file", "file"), ("memory://name", "memory", "memory"),
    ("gs://bucket/p", "fsspec", "fsspec"), ("az://container/p", "fsspec", "fsspec"),
])
def test_embedded_and_fsspec_profiles(url, profile, backend):
    c = r(url)
    assert (c.profile, c.backend) == (profile, backend)


def test_plain_path_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert r("data/kv").location == str(tmp_path / "data" / "kv")


@pytest.mark.parametrize("name,expected", [
    ("basic_v1.yaml", ("aws", "your-bucket-name", "", "https://your-bucket-name.s3.us-east-1.amazonaws.com", "virtual", True)),
    ("basic_v2.yaml", ("aws", "your-bucket-name", "", "https://your-bucket-name.s3.us-east-1.amazonaws.com", "virtual", True)),
    ("s3express_v1.yaml", ("s3express", "kvcache--use1-az4--x-s3", "team-a",
                           "https://kvcache--use1-az4--x-s3.s3express-use1-az4.us-east-1.amazonaws.com", "virtual", True)),
    ("s3express_v2.yaml", ("s3express", "kvcache--usw2-az1--x-s3", "",
                           "https://kvcache--usw2-az1--x-s3.s3express-usw2-az1.us-west-2.amazonaws.com", "virtual", True)),
    ("coreweave_v1.yaml", ("coreweave", "test-127", "test-2", "http://test-127.cwlota.com", "virtual", False)),
    ("coreweave_v2.yaml", ("coreweave", "test-127", "", "http://test-127.cwlota.com", "virtual", False)),
    ("mp_l2_s3.json", ("aws", "my-bucket", "", "https://my-bucket.s3.us-east-1.amazonaws.com", "virtual", True)),
])
def test_lmcache_documented_configs(name, expected, capsys):
    from kvstore.cli.main import main

    assert main(["resolve", "-", "-c", str(EXAMPLES / name), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    got = tuple(shown[f]["value"] for f in ("profile", "bucket", "prefix", "endpoint", "addressing", "tls"))
    assert got == expected


def test_legacy_keys_map_to_current_fields():
    c = r(None, load_extra_config(str(EXAMPLES / "basic_v1.yaml"), []))
    assert (c.io_threads, c.max_inflight, c.timeout_s) == (64, 64, 100.0)
    assert c.source_of("max_inflight") == "extra_config:s3_max_inflight_reqs"


def test_mp_spec_capacity_and_ignored_framework_keys():
    spec = json.loads((EXAMPLES / "mp_l2_s3.json").read_text())
    c = r(None, spec)
    assert c.lmcache.capacity_bytes == 500 * 1024**3
    assert c.source_of("lmcache.capacity_bytes") == "extra_config:max_capacity_gb"
    assert set(c.ignored_keys) == {"type", "eviction"}


def test_provenance_of_each_layer():
    c = r("s3://b12.s3.us-west-2.amazonaws.com/p", {"s3_num_io_threads": "8"},
          env={"AWS_ACCESS_KEY_ID": "AKIAENVKEY", "AWS_SECRET_ACCESS_KEY": "envsecret"})
    assert c.source_of("region") == "url"
    assert c.source_of("io_threads") == "extra_config:s3_num_io_threads"
    assert c.source_of("credentials") == "env:AWS_ACCESS_KEY_ID"
    assert c.source_of("max_inflight") == "default"
    assert c.source_of("addressing") == "url"
    assert r("s3://b12", env={"AWS_REGION": "ap-south-1"}).source_of("region") == "env:AWS_REGION"


def test_url_wins_over_environment_endpoint():
    c = r("s3://127.0.0.1:9000/b12", {"disable_tls": True}, env={"AWS_ENDPOINT_URL": "http://elsewhere:1"})
    assert c.endpoint == "http://127.0.0.1:9000"
    c = r("s3://b12", env={"AWS_ENDPOINT_URL": "http://10.0.0.5:7480"})
    assert (c.profile, c.endpoint, c.addressing) == ("s3", "http://10.0.0.5:7480", "path")


def test_explicit_profile_and_backend_override_detection():
    c = r("s3://b12", {"kvstore_profile": "minio", "s3_endpoint_url": "http://h:1", "kvstore_backend": "obstore"})
    assert (c.profile, c.backend) == ("minio", "obstore")


def test_yaml_strings_are_parsed():
    c = r("s3://b12", {"s3_region": "x", "s3_prefer_http2": "False", "s3_num_io_threads": "64", "s3_part_size": "16MiB",
                       "kvstore_timeout_s": "2.5"})
    assert (c.prefer_http2, c.io_threads, c.part_size, c.timeout_s) == (False, 64, 16 * 1024 * 1024, 2.5)


@pytest.mark.parametrize("url,extra,key,suggestion", [
    ("s3://b12", {"s3_regoin": "us-east-1"}, "s3_regoin", "s3_region"),
    ("s3://b12", {"disable_tsl": True, "s3_region": "x"}, "disable_tsl", "disable_tls"),
    ("s3://b12", {"kvstore_backnd": "crt", "s3_region": "x"}, "kvstore_backnd", "kvstore_backend"),
    ("s3://b12", {"aws_secret_key": "x", "s3_region": "x"}, "aws_secret_key", "aws_secret_access_key"),
])
def test_unknown_keys_get_did_you_mean(url, extra, key, suggestion):
    with pytest.raises(ConfigError) as info:
        r(url, extra)
    assert info.value.key == key and info.value.suggestion == suggestion
    assert f"did you mean {suggestion!r}" in str(info.value)


@pytest.mark.parametrize("url,extra,key", [
    ("s3://kv--usw2-az1--x-s3", {"disable_tls": True}, "disable_tls"),
    ("s3://b12.s3.us-west-2.amazonaws.com", {"s3_region": "us-east-1"}, "s3_region"),
    ("s3://b12", {"s3_region": "x", "s3_max_io_concurrency": 3, "s3_num_io_threads": 4}, "s3_num_io_threads"),
    ("s3://b12", {"s3_region": "x", "s3_enable_s3express": True}, "s3_enable_s3express"),
    ("s3://kv--usw2-az1--x-s3", {"s3_enable_s3express": False}, "s3_enable_s3express"),
    ("s3://test-127.cwlota.com", {"s3_addressing_style": "path"}, "s3_addressing_style"),
    ("s3://test-127.cwlota.com", {"s3_part_size": "8MiB"}, "s3_part_size"),
    ("s3://b12", {}, "s3_region"),
    ("s3://b12", {"s3_region": "x", "aws_access_key_id": "AKIA"}, "aws_secret_access_key"),
    ("memory://x", {"kvstore_backend": "crt"}, "kvstore_backend"),
    ("s3://127.0.0.1:9000/b12", {"s3_endpoint_url": "http://other:1"}, "s3_endpoint_url"),
    ("s3://b12", {"s3_region": "x", "s3_endpoint": "s3://other-bucket"}, "s3_endpoint"),
    ("s3://b12", {"s3_region": "x", "s3_proxy_url": "http://proxy:3128"}, "s3_proxy_url"),  # crt has no proxy
    ("file:///tmp/x", {"s3_proxy_url": "http://proxy:3128"}, "s3_proxy_url"),
    ("s3://b12", {"s3_region": "x", "kvstore_backend": "obstore", "s3_proxy_url": "socks5://p:1"}, "s3_proxy_url"),
    ("s3://b12", {"s3_region": "x", "kvstore_backend": "obstore", "s3_proxy_url": "http://p:1/path"}, "s3_proxy_url"),
    ("s3://b12", {"s3_region": "x", "kvstore_backend": "obstore", "s3_proxy_url": "http://p:99999"}, "s3_proxy_url"),
])
def test_conflicts_and_invalid_combinations(url, extra, key):
    with pytest.raises(ConfigError) as info:
        r(url, extra)
    assert info.value.key == key, str(info.value)


@pytest.mark.parametrize("url", ["", "s3://", "s3://ab", "s3://user:pw@host:9/b12", "s3://host:99999/b12",
                                 "s3://bad_bucket!", "s3://127.0.0.1:9000", "http://host:9000", "file://remote/x",
                                 "s3://a\nb", "s3://b12/x\x00y"])
def test_malformed_urls(url):
    with pytest.raises(ConfigError):
        r(url, {"s3_region": "x"})


def test_foreign_keys_are_ignored_but_recorded():
    c = r("memory://x", {"remote_storage_plugin.kvstore.module_path": "kvstore.lmcache", "storage_plugin.a.b": 1,
                         "nixl_buffer_size": 10})
    assert c.ignored_keys == ("nixl_buffer_size", "remote_storage_plugin.kvstore.module_path", "storage_plugin.a.b")


SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"


def test_secrets_never_shown(capsys):
    extra = {"s3_region": "x", "aws_access_key_id": "AKIAIOSFODNN7EXAMPLE", "aws_secret_access_key": SECRET,
             "aws_session_token": "TOKENTOKENTOKEN"}
    c = r("s3://b12", extra)
    assert c.credentials.secret_access_key.reveal() == SECRET
    for text in (repr(c), str(c), repr(c.credentials), str(c.as_dict()), str(c.rows()), f"{c}"):
        assert SECRET not in text and "TOKENTOKENTOKEN" not in text and "AKIAIOSFODNN7EXAMPLE" not in text
    from kvstore.cli.main import main

    args = [f"--set={k}={v}" for k, v in extra.items()]
    for fmt in ([], ["--json"]):
        assert main(["resolve", "s3://b12", *args, *fmt]) == 0
        out = capsys.readouterr()
        assert SECRET not in out.out + out.err and "TOKENTOKENTOKEN" not in out.out + out.err


@pytest.mark.parametrize("backend", ["obstore", "fsspec"])
def test_proxy_url_password_is_never_shown(backend, capsys):
    from urllib.parse import quote

    proxy = f"http://user:{quote(SECRET, safe='')}@proxy.internal:3128"
    extra = {"s3_region": "x", "kvstore_backend": backend, "s3_proxy_url": proxy}
    c = r("s3://b12", extra)
    assert c.proxy_url == proxy
    assert dict((name, shown) for name, shown, _ in c.rows())["proxy_url"] == "http://***@proxy.internal:3128"
    for text in (repr(c), str(c), str(c.as_dict()), str(c.rows())):
        assert "EXAMPLEKEY" not in text
    # an unencoded "/", a path, no scheme, a mangled scheme
    for malformed in (f"http://user:{SECRET}@proxy.internal:3128", proxy + "/path",
                      f"user:{SECRET}@proxy.internal:3128", f"http:/user:{SECRET}@proxy.internal:3128"):
        with pytest.raises(ConfigError) as info:
            r("s3://b12", {**extra, "s3_proxy_url": malformed})
        assert "EXAMPLEKEY" not in str(info.value) and "proxy.internal:3128" in str(info.value)
    from kvstore.cli.main import main

    for command in (["resolve", "s3://b12", "--json"], ["lmcache-config", "s3://b12"]):
        assert main([*command, *(f"--set={k}={v}" for k, v in extra.items())]) == 0
        out = capsys.readouterr()
        assert "EXAMPLEKEY" not in out.out + out.err
        assert "proxy.internal" in out.out or "withheld: s3_proxy_url" in out.out


def test_lmcache_config_keeps_a_proxy_without_password_and_names_only_what_it_withholds(capsys):
    from kvstore.cli.main import main

    base = ["lmcache-config", "s3://b12", "--set", "s3_region=x", "--set", "kvstore_backend=obstore"]
    assert main([*base, "--set", "s3_proxy_url=http://proxy.internal:3128"]) == 0
    out = capsys.readouterr().out
    assert "s3_proxy_url: http://proxy.internal:3128" in out and "withheld" not in out
    assert main([*base, "--set", "aws_access_key_id=AKIAEXAMPLE", "--set", f"aws_secret_access_key={SECRET}"]) == 0
    out = capsys.readouterr().out
    assert "withheld: aws_access_key_id, aws_secret_access_key;" in out and "s3_proxy_url" not in out
    assert SECRET not in out


def test_lmcache_keys_resolve_into_their_own_options():
    c = r("memory://lm", {"kvstore_key_layout": "hashed", "save_chunk_meta": "true", "max_capacity_gb": 0.5})
    assert c.lmcache == LMCacheOptions(key_layout="hashed", save_chunk_meta=True, capacity_bytes=512 * 1024**2)
    assert not {"key_layout", "save_chunk_meta", "capacity_bytes"} & set(kvstore.StoreConfig.__dataclass_fields__)
    rows = {name: (shown, source) for name, shown, source in c.rows()}
    assert rows["lmcache.key_layout"] == ("hashed", "extra_config:kvstore_key_layout")
    assert c.as_dict()["lmcache.capacity_bytes"] == {"value": 512 * 1024**2, "source": "extra_config:max_capacity_gb"}
    assert r("memory://lm").as_dict()["lmcache.key_layout"] == {"value": "flat", "source": "default"}
    changed = c.with_overrides(lmcache=LMCacheOptions())
    assert changed.lmcache.key_layout == "flat" and changed.source_of("lmcache.key_layout") == "override"
    with pytest.raises(ConfigError, match="max_capacity_gb must not be negative") as info:
        r("memory://lm", {"max_capacity_gb": -1})
    assert info.value.key == "max_capacity_gb"
    with pytest.raises(ConfigError, match="kvstore_key_layout must be one of flat, hashed"):
        LMCacheOptions(key_layout="sharded")


def test_key_table_is_consistent():
    for key in K.KEYS:
        assert key.origin in ("lmcache", "lmcache-legacy", "lmcache-mp", "kvstore")
        assert key.doc.endswith(".")
        if key.legacy_of:
            assert key.legacy_of in K.BY_NAME
    for key in K.KEYS:
        group, _, name = (key.field or "").rpartition(".")
        owner = {"": kvstore.StoreConfig, "lmcache": LMCacheOptions}[group]
        assert not key.field or name in owner.__dataclass_fields__, key


# -- property-based: no input raises anything but ConfigError, and what resolves is coherent --
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
_host = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}(:[0-9]{1,6})?", fullmatch=True)
_urls = st.one_of(
    _text,
    st.builds(lambda s, h, p: f"{s}://{h}/{p}", st.sampled_from(["s3", "http", "https", "minio", "file", "memory", "gs", "s3a"]), _host, _text),
    st.builds(lambda h: f"s3://{h}", _host),
)
_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(allow_nan=True), _text,
                    st.sampled_from(["True", "false", "64", "8MiB", "virtual", "path", "crc32c", "crt", "aws"]))
_keys = st.one_of(st.sampled_from(sorted(K.BY_NAME)), _text, st.sampled_from(["s3_regoin", "remote_storage_plugin.x"]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_urls, st.dictionaries(_keys, _values, max_size=5))
def test_fuzz_only_config_errors(url, extra):
    try:
        c = r(url, extra)
    except ConfigError:
        return
    assert c.profile in ("aws", "s3express", "coreweave", "minio", "s3", "file", "memory", "fsspec")
    if c.is_s3:
        assert c.endpoint.startswith("https://" if c.tls else "http://")
        assert c.addressing in ("virtual", "path")
        if c.addressing == "virtual":
            assert f"//{c.bucket}." in c.endpoint
        if c.profile == "s3express":
            assert c.tls and c.s3express and "--x-s3" in c.bucket
        if c.profile == "coreweave":
            assert c.addressing == "virtual" and c.part_size >= 15 * 1024 * 1024


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"[a-z0-9][a-z0-9-]{1,20}[a-z0-9]", fullmatch=True), st.sampled_from(["us-east-1", "eu-west-2", "ap-south-1"]),
       st.from_regex(r"([a-z0-9_-]{1,8}(/[a-z0-9_-]{1,8}){0,2})?", fullmatch=True))
def test_fuzz_aws_host_form_never_changes_bucket_or_region(bucket, region, prefix):
    c = r(f"s3://{bucket}.s3.{region}.amazonaws.com/{prefix}")
    assert (c.profile, c.bucket, c.region, c.prefix) == ("aws", bucket, region, prefix)


@pytest.mark.parametrize("source", ["kvstore_url", "s3_endpoint", "remote_url in a config file"])
def test_a_url_in_extra_config_resolves_as_the_same_url_given_directly(source, monkeypatch, tmp_path):
    # The endpoint must decide the profile whichever way the URL came: a URL from extra_config
    # once kept the aws profile (virtual-hosted, bucket1.127.0.0.1) while the same URL given
    # directly was a path-style self-hosted store.
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    endpoint = {"s3_endpoint_url": "http://127.0.0.1:9000"}
    if source == "remote_url in a config file":
        path = tmp_path / "lmcache.yaml"
        path.write_text("remote_url: s3://bucket1/kv\nextra_config:\n  s3_endpoint_url: http://127.0.0.1:9000\n")
        extra = load_extra_config(str(path), [])
    else:
        extra = {source: "s3://bucket1/kv", **endpoint}
    direct = r("s3://bucket1/kv", endpoint)
    given = kvstore.resolve(None, extra)
    assert (given.profile, given.addressing, given.endpoint, given.bucket) == \
           (direct.profile, direct.addressing, direct.endpoint, direct.bucket) == ("s3", "path", "http://127.0.0.1:9000", "bucket1")


@pytest.mark.parametrize("url, profile", [
    ("s3://bucket1/kv", "file"), ("s3://bucket1/kv", "memory"), ("file:///tmp/x", "minio"), ("memory://x", "file"),
])
def test_a_forced_profile_of_another_kind_of_store_is_refused(url, profile):
    with pytest.raises(ConfigError, match="does not fit") as info:
        r(url, {"kvstore_profile": profile, "s3_region": "us-east-1"})
    assert info.value.key == "kvstore_profile"


def test_a_forced_s3_profile_still_refines_an_s3_url():
    c = r("s3://bucket1/kv", {"kvstore_profile": "minio", "s3_endpoint_url": "http://127.0.0.1:9000"})
    assert (c.profile, c.bucket, c.prefix) == ("minio", "bucket1", "kv")


@pytest.mark.parametrize("url", ["s3://bucket1?region=us-west-2", "s3://bucket1/kv#x", "s3://bucket1/kv?",
                                 "http://127.0.0.1:9000/b12/p?x=1", "file:///tmp/x?y", "memory://x?y"])
def test_a_query_or_fragment_that_nothing_reads_is_refused(url):
    with pytest.raises(ConfigError, match="does not read"):
        r(url, {"s3_region": "us-east-1"})


def test_a_presigned_query_is_named_not_quoted():
    with pytest.raises(ConfigError) as info:
        r("https://h:9/b12/k?X-Amz-Signature=SIGNATURE123&X-Amz-Credential=AKIAEXAMPLE", {})
    assert "X-Amz-Signature" in str(info.value) and "SIGNATURE123" not in str(info.value)
    assert "AKIAEXAMPLE" not in str(info.value)


def test_a_plain_path_may_hold_a_question_mark(tmp_path):
    assert r(str(tmp_path / "a?b")).location.endswith("a?b")


def test_a_bucket_with_capitals_in_the_host_is_refused_not_lowercased():
    with pytest.raises(ConfigError, match="capitals"):
        r("s3://Bucket1/kv", {"s3_region": "us-east-1"})


@pytest.mark.parametrize("argv", [
    ["kv", "cp", "s3://a1b/x", "s3://c1d/y", f"--set=aws_secret_access_key={SECRET}"],
    ["ls", "s3://b12", "--sett", f"aws_secret_access_key={SECRET}"],
    ["resolve", "s3://b12", "--bogus", f"s3_proxy_url=http://u:{SECRET.replace('/', '')}@p:1"],
])
def test_usage_errors_never_echo_a_secret(argv, capsys):
    from kvstore.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err
    assert SECRET not in err and SECRET.replace("/", "") not in err and "EXAMPLEKEY" not in err


@pytest.mark.parametrize("url, extra, key", [
    ("file:///tmp/x", {"s3_endpoint_url": "http://127.0.0.1:9000"}, "s3_endpoint_url"),
    ("file:///tmp/x", {"s3_region": "us-east-1"}, "s3_region"),
    ("memory://x", {"s3_addressing_style": "path"}, "s3_addressing_style"),
    ("s3://b12", {"s3_region": "x", "kvstore_fsync": True}, "kvstore_fsync"),
    ("s3://b12", {"s3_region": "x", "s3_prefer_http2": True, "disable_tls": True}, "s3_prefer_http2"),
])
def test_a_setting_for_another_kind_of_store_is_named_not_dropped(url, extra, key):
    with pytest.raises(ConfigError, match="does not apply|needs TLS") as info:
        r(url, extra)
    assert info.value.key == key
    assert r("file:///tmp/x", {"kvstore_fsync": True}).fsync
