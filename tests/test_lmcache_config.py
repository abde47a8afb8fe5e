"""``kvstore lmcache-config``: the printed configuration loads in LMCache and never shows secrets."""

from __future__ import annotations

import argparse
import json

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


def test_non_mp_yaml_loads_in_lmcache_and_hides_secrets(capsys):
    out = run(capsys, "s3://my-bucket/kv", "--set", "s3_region=us-east-1", "--set", "aws_access_key_id=AKIAEXAMPLE",
              "--set", "aws_secret_access_key=very-secret-value")
    assert "very-secret-value" not in out and "AKIAEXAMPLE" not in out
    loaded = yaml.safe_load(out)
    assert loaded["extra_config"]["kvstore_url"] == "s3://my-bucket/kv"
    config_mod = pytest.importorskip("lmcache.v1.config", reason="lmcache is not importable")
    config = config_mod.LMCacheEngineConfig.from_dict(loaded)
    assert config.remote_storage_plugins == ["kvstore"]


def test_mp_spec_is_json_for_the_plugin_loader(capsys):
    spec = json.loads(run(capsys, "s3://my-bucket/kv", "--mode", "mp", "--set", "s3_region=eu-west-1"))
    assert spec["type"] == "plugin" and spec["module_path"] == "kvstore.lmcache.l2"
    assert spec["adapter_params"] == {"kvstore_url": "s3://my-bucket/kv", "s3_region": "eu-west-1"}


def test_unresolvable_store_is_refused(capsys):
    with pytest.raises(ConfigError):
        run(capsys, "s3://my-bucket/kv", "--set", "s3_regoin=us-east-1")


def test_key_layouts():
    from kvstore.lmcache import naming

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
