"""``kvstore lmcache-config``: the printed configuration loads in LMCache and never shows secrets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from kvstore.cli import lmcache_cmd
from kvstore.errors import ConfigError


def run(capsys, *argv: str) -> str:
    parser = argparse.ArgumentParser()
    lmcache_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["lmcache-config", *argv])
    assert args.handler(args) == 0
    return capsys.readouterr().out


@pytest.mark.lmcache
def test_non_mp_yaml_loads_in_lmcache_and_hides_secrets(capsys):
    out = run(capsys, "s3://my-bucket/kv", "--set", "s3_region=us-east-1", "--set", "aws_access_key_id=AKIAEXAMPLE",
              "--set", "aws_secret_access_key=very-secret-value")
    assert "very-secret-value" not in out and "AKIAEXAMPLE" not in out
    loaded = yaml.safe_load(out)
    assert loaded["extra_config"]["kvstore_url"] == "s3://my-bucket/kv"
    config_mod = pytest.importorskip("lmcache.v1.config", reason="lmcache is not importable")
    config = config_mod.LMCacheEngineConfig.from_dict(loaded)
    assert config.remote_storage_plugins == ["kvstore"]


EXAMPLES = Path(__file__).parent / "data" / "lmcache_examples"


def run_err(capsys, *argv: str) -> tuple[str, str]:
    parser = argparse.ArgumentParser()
    lmcache_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["lmcache-config", *argv])
    assert args.handler(args) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_mp_spec_is_json_for_the_plugin_loader(capsys):
    spec = json.loads(run(capsys, "s3://my-bucket/kv", "--mode", "mp", "--set", "s3_region=eu-west-1"))
    assert spec["type"] == "plugin" and spec["module_path"] == "kvstore.lmcache.l2"
    assert spec["adapter_params"] == {"kvstore_url": "s3://my-bucket/kv", "s3_region": "eu-west-1"}


def lmcache_parse(spec: dict):
    """What LMCache's own --l2-adapter parser makes of a spec."""
    config_mod = pytest.importorskip("lmcache.v1.distributed.l2_adapters.config", reason="lmcache is not importable")
    parser = argparse.ArgumentParser()
    config_mod.add_l2_adapters_args(parser)
    parsed = config_mod.parse_args_to_l2_adapters_config(parser.parse_args(["--l2-adapter", json.dumps(spec)]))
    (adapter,) = parsed.adapters
    return adapter


@pytest.mark.lmcache
@pytest.mark.parametrize("source", ["builtin-s3-spec", "set"])
def test_mp_spec_keeps_the_eviction_policy_for_lmcache_parser(capsys, source):
    if source == "builtin-s3-spec":
        argv = ["-c", str(EXAMPLES / "mp_l2_s3.json")]  # eviction 0.85 / 0.2, max_capacity_gb 500
    else:
        argv = ["s3://my-bucket", "--set", "s3_region=us-east-1", "--set", "max_capacity_gb=500",
                "--set", 'eviction={"eviction_policy": "LRU", "trigger_watermark": 0.85, "eviction_ratio": 0.2}']
    out, err = run_err(capsys, "--mode", "mp", *argv)
    spec = json.loads(out)
    assert "eviction" not in spec["adapter_params"]
    adapter = lmcache_parse(spec)
    assert adapter.eviction_config is not None
    assert (adapter.eviction_config.eviction_policy, adapter.eviction_config.trigger_watermark,
            adapter.eviction_config.eviction_ratio) == ("LRU", 0.85, 0.2)
    assert adapter.adapter_params["max_capacity_gb"] in (500, "500")
    assert ("type: 's3' -> 'plugin'" if source == "builtin-s3-spec" else "eviction: moved from the command line") in err


@pytest.mark.lmcache
def test_mp_spec_moves_framework_keys_out_of_adapter_params(capsys, tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({
        "type": "plugin", "module_path": "kvstore.lmcache.l2", "class_name": "KVStoreL2Adapter",
        "adapter_params": {"kvstore_url": "s3://bkt", "s3_region": "us-east-1", "max_capacity_gb": 10,
                           "eviction": {"eviction_policy": "ARC"}, "persist_enabled": False},
        "affinity_tag": "_default"}))
    out, err = run_err(capsys, "--mode", "mp", "-c", str(spec_file))
    spec = json.loads(out)
    assert spec["adapter_params"] == {"kvstore_url": "s3://bkt", "s3_region": "us-east-1", "max_capacity_gb": 10}
    assert spec["affinity_tag"] == "_default" and spec["persist_enabled"] is False
    adapter = lmcache_parse(spec)
    assert adapter.eviction_config.eviction_policy == "ARC" and adapter.persist_config.persist_enabled is False
    assert "persist_enabled: moved" in err


def test_mp_spec_refuses_a_wrong_eviction_policy(capsys):
    with pytest.raises(ConfigError, match="eviction_policy"):
        run(capsys, "s3://bkt", "--mode", "mp", "--set", "s3_region=us-east-1", "--set", "eviction={eviction_policy: LFU}")


def test_mp_spec_warns_when_capacity_has_no_eviction(capsys):
    _, err = run_err(capsys, "s3://bkt", "--mode", "mp", "--set", "s3_region=us-east-1", "--set", "max_capacity_gb=5")
    assert "grows without limit" in err


@pytest.mark.lmcache
@pytest.mark.parametrize("example", ["basic_v1.yaml", "basic_v2.yaml", "coreweave_v1.yaml", "coreweave_v2.yaml",
                                     "s3express_v1.yaml", "s3express_v2.yaml"])
def test_existing_file_keeps_every_key_it_need_not_change(capsys, example):
    original = yaml.safe_load((EXAMPLES / example).read_text())
    out, err = run_err(capsys, "-c", str(EXAMPLES / example))
    converted = yaml.safe_load(out)
    for key, value in original.items():
        if key not in ("remote_url", "extra_config"):
            assert converted[key] == value, key
    assert "remote_url" not in converted  # it would be a second backend: every chunk written twice
    assert converted["remote_storage_plugins"] == ["kvstore"]
    extra = converted["extra_config"]
    assert extra["kvstore_url"] == original["remote_url"]
    for key, value in original["extra_config"].items():
        if not key.startswith("aws_"):
            assert extra[key] == value, key
    assert "aws_secret_access_key" not in extra and "your-secret-access-key" not in out + err
    assert "changed: remote_url: removed" in err and "remote_storage_plugins: added" in err
    config_mod = pytest.importorskip("lmcache.v1.config", reason="lmcache is not importable")
    config = config_mod.LMCacheEngineConfig.from_dict(converted)
    assert (config.chunk_size, config.local_cpu, config.save_unfull_chunk) == (
        original["chunk_size"], original["local_cpu"], original["save_unfull_chunk"])
    assert config.remote_url is None and config.remote_storage_plugins == ["kvstore"]


def test_existing_plugin_file_with_remote_url_warns_of_double_writes(capsys, tmp_path):
    path = tmp_path / "lmcache.yaml"
    path.write_text(yaml.safe_dump({
        "chunk_size": 64, "local_cpu": False, "max_local_cpu_size": 50, "remote_url": "lm://cache-server:65432",
        "remote_storage_plugins": "kvstore",
        "extra_config": {"remote_storage_plugin.kvstore.module_path": "wrong.module", "kvstore_url": "s3://bkt/kv",
                         "s3_region": "us-east-1"}}))
    out, err = run_err(capsys, "-c", str(path))
    converted = yaml.safe_load(out)
    assert (converted["chunk_size"], converted["local_cpu"], converted["max_local_cpu_size"]) == (64, False, 50)
    assert converted["remote_url"] == "lm://cache-server:65432"
    assert "warning: remote_url" in err and "twice" in err
    assert converted["remote_storage_plugins"] == ["kvstore"]
    assert converted["extra_config"]["remote_storage_plugin.kvstore.module_path"] == "kvstore.lmcache"
    assert "'wrong.module' -> kvstore.lmcache" in err


def test_l2_spec_with_non_mp_mode_is_refused(capsys):
    with pytest.raises(ConfigError, match="--mode mp"):
        run(capsys, "-c", str(EXAMPLES / "mp_l2_s3.json"))


def test_unresolvable_store_is_refused(capsys):
    with pytest.raises(ConfigError):
        run(capsys, "s3://my-bucket/kv", "--set", "s3_regoin=us-east-1")


def test_key_layouts():
    from kvstore import naming

    assert naming.chunk_name("org/m@1@0@-22b@bfloat16") == "org_m@1@0@-22b@bfloat16"
    hashed = naming.chunk_name("org/m@1@0@-22b@bfloat16", "hashed")
    head, _, rest = hashed.partition("/")
    assert len(head) == 4 and rest == "org_m@1@0@-22b@bfloat16"
    assert naming.strip_layout(hashed, "hashed") == rest
    assert naming.object_key_string("org/m", 3, 0, bytes.fromhex("deadbeef")) == "org/m@00000003@0@deadbeef"
    long_name = naming.chunk_name("m" * 2000 + "@1@0@1@bfloat16")
    assert long_name.startswith("long/") and len(long_name) < 100
    with pytest.raises(ValueError):
        naming.apply_layout("x", "sharded")
