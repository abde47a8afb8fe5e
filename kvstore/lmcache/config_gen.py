"""Ready-to-use LMCache configuration for a kvstore URL (what ``kvstore lmcache-config`` prints).

Secrets are never written out: a configuration that needs static keys gets them from the
environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) instead, and a proxy URL (which may carry
a password) is left for the user to add.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from kvstore.config import StoreConfig, resolve
from kvstore.config import keys as K

PLUGIN = "kvstore"
NON_MP_KEYS = {
    f"remote_storage_plugin.{PLUGIN}.module_path": "kvstore.lmcache",
    f"remote_storage_plugin.{PLUGIN}.class_name": "KVStoreConnectorAdapter",
}


def _public(extra: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if not K.is_secret(k, v)}


def check(url: str, extra: Mapping[str, Any]) -> StoreConfig:
    """The store the configuration describes; ConfigError when it would not resolve."""
    return resolve(url, extra)


def non_mp_config(url: str, extra: Mapping[str, Any], *, chunk_size: int = 256, max_local_cpu_size: float = 5) -> dict[str, Any]:
    """An LMCache (non-MP) config dict using the remote-storage plugin."""
    check(url, extra)
    return {
        "chunk_size": chunk_size,
        "local_cpu": True,
        "max_local_cpu_size": max_local_cpu_size,
        "remote_storage_plugins": [PLUGIN],
        "extra_config": {**NON_MP_KEYS, "kvstore_url": url, **_public(extra)},
    }


def l2_adapter_spec(url: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    """An MP-mode ``--l2-adapter`` spec using the kvstore L2 adapter."""
    check(url, extra)
    return {
        "type": "plugin",
        "module_path": "kvstore.lmcache.l2",
        "class_name": "KVStoreL2Adapter",
        "config_class_name": "KVStoreL2AdapterConfig",
        "adapter_params": {"kvstore_url": url, **_public(extra)},
    }


def render(url: str, extra: Mapping[str, Any], mode: str = "non-mp") -> str:
    """The text to paste: YAML for non-MP, one-line JSON for MP."""
    if mode == "mp":
        return json.dumps(l2_adapter_spec(url, extra))
    import yaml

    return withheld_note(extra) + yaml.safe_dump(non_mp_config(url, extra), sort_keys=False)


def withheld_note(extra: Mapping[str, Any]) -> str:
    """A comment line naming what was left out of the configuration and what to do instead ("" if nothing)."""
    withheld = sorted(k for k, v in extra.items() if K.is_secret(k, v))
    if not withheld:
        return ""
    advice = []
    if any(k.startswith("aws_") for k in withheld):
        advice.append("export AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead of static keys")
    if "s3_proxy_url" in withheld:
        advice.append("add s3_proxy_url (it carries a password) by hand")
    return f"# withheld: {', '.join(withheld)}; {'; '.join(advice)}\n"
