"""LMCache configuration for a kvstore store (what ``kvstore lmcache-config`` prints).

Given a URL alone it writes a fresh configuration. Given the user's own LMCache file it keeps
every key it does not have to change (``chunk_size``, ``local_cpu``, ``save_unfull_chunk``, ...)
and only adds or fixes the plugin keys, listing each change, so the engine runs as the user set
it up. Secrets are never written out: a configuration that needs static keys gets them from the
environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) instead, and a proxy URL (which may carry
a password) is left for the user to add.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvstore.config import StoreConfig, resolve
from kvstore.config import keys as K
from kvstore.errors import ConfigError

PLUGIN = "kvstore"
NON_MP_KEYS = {
    f"remote_storage_plugin.{PLUGIN}.module_path": "kvstore.lmcache",
    f"remote_storage_plugin.{PLUGIN}.class_name": "KVStoreConnectorAdapter",
}
STORAGE_PLUGIN_KEYS = {
    f"storage_plugin.{PLUGIN}.module_path": "kvstore.lmcache",
    f"storage_plugin.{PLUGIN}.class_name": "KVStoreStoragePlugin",
}
L2_PLUGIN = {
    "type": "plugin",
    "module_path": "kvstore.lmcache.l2",
    "class_name": "KVStoreL2Adapter",
    "config_class_name": "KVStoreL2AdapterConfig",
}
# Keys LMCache's L2 framework reads from the top level of an --l2-adapter spec
# (l2_adapters/config.py: parse_args_to_l2_adapters_config); inside adapter_params nobody reads them.
L2_FRAMEWORK_KEYS = ("eviction", "serde", "persist_enabled", "affinity_tag", "shared")
# Keys LMCache reads from the top level of a plugin spec (parse_args_to_l2_adapters_config,
# PluginL2AdapterConfig); written inside adapter_params they would silently do nothing.
TOP_LEVEL_KEYS = (*L2_FRAMEWORK_KEYS, "type", "module_path", "class_name", "config_class_name", "adapter_params")
# Worker counts of LMCache's built-in adapters; the kvstore adapter's concurrency is kvstore_max_inflight.
WORKER_KEYS = ("num_workers", "per_op_workers")
# What LMCache 0.5.6's _parse_eviction_config accepts; checked here so a typo fails now, not at server start.
EVICTION_POLICIES = ("LRU", "ARC", "IsolatedLRU", "noop")
# Policies that act on a usage fraction, so they need a capacity (L2AdapterInterface.supports_global_eviction).
CAPACITY_POLICIES = ("LRU", "ARC")


@dataclass
class Generated:
    """A configuration plus what was changed in the user's file and what to watch out for."""

    config: dict[str, Any]
    mode: str
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    withheld: list[str] = field(default_factory=list)

    def text(self) -> str:
        """The text to paste: YAML for non-MP (with a comment naming withheld keys), one-line JSON for MP."""
        if self.mode == "mp":
            return json.dumps(self.config)
        import yaml

        note = f"# {withheld_advice(self.withheld)}\n" if self.withheld else ""
        dumped: str = yaml.safe_dump(self.config, sort_keys=False)
        return note + dumped


def _public(extra: Mapping[str, Any], withheld: list[str] | None = None) -> dict[str, Any]:
    out = {}
    for k, v in extra.items():
        if K.is_secret(k, v):
            if withheld is not None:
                withheld.append(k)
        else:
            out[k] = v
    return out


def check(url: str | None, extra: Mapping[str, Any]) -> StoreConfig:
    """The store the configuration describes; ConfigError when it would not resolve."""
    return resolve(url, extra)


def non_mp_config(url: str, extra: Mapping[str, Any], *, chunk_size: int = 256, max_local_cpu_size: float = 5) -> dict[str, Any]:
    """A fresh LMCache (non-MP) config dict using the remote-storage plugin."""
    check(url, extra)
    return {
        "chunk_size": chunk_size,
        "local_cpu": True,
        "max_local_cpu_size": max_local_cpu_size,
        "remote_storage_plugins": [PLUGIN],
        "extra_config": {**NON_MP_KEYS, "kvstore_url": url, **_public(extra)},
    }


def fresh(url: str | None, extra: Mapping[str, Any]) -> Generated:
    """A fresh non-MP configuration for a URL (no file to keep keys from)."""
    if not url:
        raise ConfigError("a store URL is required (or -c with an LMCache config file)")
    return Generated(non_mp_config(url, extra), "non-mp", withheld=[k for k, v in extra.items() if K.is_secret(k, v)])


def l2_adapter_spec(url: str | None, extra: Mapping[str, Any]) -> dict[str, Any]:
    """An MP-mode ``--l2-adapter`` spec: framework keys (``eviction``, ...) at the top level, the rest in adapter_params."""
    return mp_config(None, url, extra).config


def render(url: str, extra: Mapping[str, Any], mode: str = "non-mp") -> str:
    """The text to paste for a URL alone: YAML for non-MP, one-line JSON for MP."""
    if mode == "mp":
        return mp_config(None, url, extra).text()
    import yaml

    dumped: str = yaml.safe_dump(non_mp_config(url, extra), sort_keys=False)
    return withheld_note(extra) + dumped


def withheld_advice(withheld: list[str]) -> str:
    """What was left out of the configuration and what to do instead."""
    advice = []
    if any(k.startswith("aws_") for k in withheld):
        advice.append("export AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead of static keys")
    if "s3_proxy_url" in withheld:
        advice.append("add s3_proxy_url (it carries a password) by hand")
    return f"withheld: {', '.join(sorted(set(withheld)))}; {'; '.join(advice)}"


def withheld_note(extra: Mapping[str, Any]) -> str:
    """A comment line naming what was left out of the configuration and what to do instead ("" if nothing)."""
    withheld = [k for k, v in extra.items() if K.is_secret(k, v)]
    return f"# {withheld_advice(withheld)}\n" if withheld else ""


# -- the user's file ---------------------------------------------------------------------------
def read_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML/JSON file, as written (ConfigError when unreadable or not a mapping)."""
    import yaml

    try:
        with open(path) as f:
            loaded = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML or JSON: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of key: value, got {type(loaded).__name__}")
    return loaded


def is_l2_spec(raw: Mapping[str, Any]) -> bool:
    """Whether a file holds an MP-mode ``--l2-adapter`` spec rather than an LMCache engine config."""
    return "type" in raw and "extra_config" not in raw and "chunk_size" not in raw


def check_adapter_params(params: Mapping[str, Any]) -> None:
    """Refuse keys in the kvstore adapter's adapter_params that LMCache reads elsewhere or not at all."""
    misplaced = [k for k in TOP_LEVEL_KEYS if k in params]
    if misplaced:
        names = ", ".join(repr(k) for k in misplaced)
        example = '{"type": "plugin", ..., "adapter_params": {...}, "' + misplaced[0] + '": ...}'
        raise ConfigError(
            f"{names} inside adapter_params of the kvstore L2 spec, where LMCache never reads it: put it at the "
            f"top level of the --l2-adapter spec, next to adapter_params ({example}); "
            "`kvstore lmcache-config --mode mp -c SPEC` moves it"
        )
    workers = [k for k in WORKER_KEYS if k in params]
    if workers:
        raise ConfigError(f"{', '.join(repr(k) for k in workers)} in adapter_params: only LMCache's built-in adapters "
                          "read it; the kvstore adapter's concurrency is kvstore_max_inflight")


def store_settings(raw: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(store URL or None, store keys) that a file describes: an LMCache config, an L2 spec, or bare extra_config."""
    if is_l2_spec(raw):
        params = _l2_params(raw, changes=[])
        if raw.get("type") == "plugin":
            check_adapter_params(params)  # what the adapter itself will refuse at server start
        return params.get("kvstore_url"), params
    if "extra_config" in raw or "remote_url" in raw or "chunk_size" in raw:
        extra = dict(_extra_config_of(raw))
        url = extra.get("kvstore_url") or raw.get("remote_url") or None
        return url, extra
    return raw.get("kvstore_url"), dict(raw)


def file_warnings(raw: Mapping[str, Any]) -> list[str]:
    """What in an LMCache file makes the engine behave differently from a probe through kvstore."""
    if is_l2_spec(raw):
        return []
    remote_url = raw.get("remote_url")
    plugged = any(PLUGIN in _plugin_list(dict(raw), k) for k in ("remote_storage_plugins", "storage_plugins"))
    if remote_url and plugged:
        return [f"remote_url {remote_url!r} and the kvstore plugin are both set: LMCache writes every chunk twice "
                "(`kvstore lmcache-config -c FILE` fixes it)"]
    if remote_url and not plugged:
        return [f"remote_url {remote_url!r} without the kvstore plugin: LMCache's own connector serves it, "
                "and this probe goes through kvstore (`kvstore lmcache-config -c FILE` switches the file to kvstore)"]
    return []


def _extra_config_of(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    extra = raw.get("extra_config")
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"extra_config must be a mapping, got {type(extra).__name__}")
    return extra


def _plugin_list(cfg: dict[str, Any], key: str) -> list[str]:
    value = cfg.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError(f"{key} must be a list of plugin names, got {type(value).__name__}")
    return [str(v) for v in value]


def non_mp_from_file(raw: Mapping[str, Any], url: str | None, sets: Mapping[str, Any]) -> Generated:
    """The user's LMCache config with the kvstore plugin added or fixed; every other key kept as written."""
    if is_l2_spec(raw):
        raise ConfigError("this file is an MP-mode --l2-adapter spec; use --mode mp")
    cfg: dict[str, Any] = copy.deepcopy(dict(raw))
    out = Generated(cfg, "non-mp")
    extra = dict(_extra_config_of(cfg))
    for name, value in sets.items():
        if extra.get(name) != value and name != "kvstore_url":
            was = f"{extra[name]!r} -> " if name in extra else ""
            shown = "(secret)" if K.is_secret(name, value) else repr(value)
            out.changes.append(f"extra_config.{name}: {was if not K.is_secret(name, value) else ''}{shown} (--set)")
        extra[name] = value
    remote_url = cfg.get("remote_url") or None
    storage = PLUGIN in _plugin_list(cfg, "storage_plugins")
    key = "storage_plugins" if storage else "remote_storage_plugins"
    had_plugin = PLUGIN in _plugin_list(cfg, key)

    file_url = extra.get("kvstore_url") or None
    store_url = url or file_url or remote_url
    if store_url is None:
        raise ConfigError("no store URL: give one on the command line, or set extra_config.kvstore_url or remote_url")
    if file_url and url and file_url != url:
        out.changes.append(f"extra_config.kvstore_url: {file_url} -> {url} (the URL on the command line wins)")
    elif not file_url:
        out.changes.append(f"extra_config.kvstore_url: {store_url} (added)")
    extra["kvstore_url"] = store_url

    if remote_url:
        both = f"remote_url {remote_url!r} and {key} [{PLUGIN}] are both set: LMCache then creates two remote backends and writes every chunk twice"
        if remote_url == store_url or (not had_plugin and str(remote_url).startswith("s3://")):
            del cfg["remote_url"]
            why = "the kvstore plugin now serves this store" if remote_url == store_url else f"replaced by the kvstore plugin on {store_url}"
            out.changes.append(f"remote_url: removed ({why}; with both set LMCache writes every chunk twice)")
            if had_plugin:
                out.warnings.append(both + "; removed remote_url")
        else:
            out.warnings.append(both + "; remove remote_url unless you want both")

    plugins = _plugin_list(cfg, key)
    if PLUGIN not in plugins:
        plugins.append(PLUGIN)
        out.changes.append(f"{key}: added {PLUGIN!r}")
    elif cfg.get(key) != plugins:
        out.changes.append(f"{key}: written as a list {plugins}")
    if key not in cfg:  # where remote_url was, else before extra_config: next to what it replaces
        anchor = "remote_url" if "remote_url" in raw else "extra_config"
        keys = [k for k in raw if k in cfg or k == anchor]
        at = keys.index(anchor) if anchor in keys else len(keys)
        order = keys[:at] + [key] + keys[at:]
        cfg[key] = plugins
        reordered = {k: cfg[k] for k in order if k in cfg}
        cfg.clear()
        cfg.update(reordered)
    cfg[key] = plugins
    for name, value in (STORAGE_PLUGIN_KEYS if storage else NON_MP_KEYS).items():
        if extra.get(name) != value:
            was = f"{extra[name]!r} -> " if name in extra else ""
            out.changes.append(f"extra_config.{name}: {was}{value}{'' if was else ' (added)'}")
        extra[name] = value
    check(store_url, extra)
    public = _public(extra, out.withheld)
    for name in out.withheld:
        out.changes.append(f"extra_config.{name}: left out (a secret is never printed)")
    # Plugin keys first, then the user's keys in their order: what LMCache loads is easy to see.
    plugin_keys = STORAGE_PLUGIN_KEYS if storage else NON_MP_KEYS
    first = [*plugin_keys, "kvstore_url"]
    cfg["extra_config"] = {**{k: public[k] for k in first}, **{k: v for k, v in public.items() if k not in first}}
    return out


# -- MP mode -----------------------------------------------------------------------------------
def _as_mapping(name: str, value: Any) -> Any:
    """A framework key given with --set arrives as text: read it as JSON/YAML."""
    if not isinstance(value, str) or name not in ("eviction", "serde"):
        return value
    import yaml

    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name} must be a mapping such as '{{\"eviction_policy\": \"LRU\"}}', got {value!r}") from exc
    if not isinstance(parsed, dict):
        raise ConfigError(f"{name} must be a mapping such as '{{\"eviction_policy\": \"LRU\"}}', got {value!r}")
    return parsed


def _l2_params(raw: Mapping[str, Any], changes: list[str]) -> dict[str, Any]:
    """The store keys of an L2 spec: adapter_params of a plugin spec, or the keys of a built-in ``s3`` spec."""
    kind = raw.get("type")
    if kind == "plugin":
        params = raw.get("adapter_params") or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"adapter_params must be a mapping, got {type(params).__name__}")
        return dict(params)
    if kind == "s3":
        changes.append("type: 's3' -> 'plugin' (the built-in S3 adapter's keys moved into adapter_params)")
        return {k: v for k, v in raw.items() if k != "type" and k not in L2_FRAMEWORK_KEYS}
    raise ConfigError(f"--l2-adapter type {kind!r}: kvstore takes over 's3' and kvstore 'plugin' specs only")


def validate_eviction(eviction: Any) -> None:
    """Refuse an eviction block LMCache would refuse at server start (same rules as its parser)."""
    if not isinstance(eviction, Mapping):
        raise ConfigError(f"eviction must be a mapping, got {type(eviction).__name__}")
    policy = eviction.get("eviction_policy")
    if policy not in EVICTION_POLICIES:
        raise ConfigError(f"eviction.eviction_policy must be one of {', '.join(EVICTION_POLICIES)}, got {policy!r}")
    for name in ("trigger_watermark", "eviction_ratio"):
        if name in eviction:
            try:
                value = float(eviction[name])
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"eviction.{name} must be a number, got {eviction[name]!r}") from exc
            if not 0 < value <= 1:
                raise ConfigError(f"eviction.{name} must be in (0, 1], got {value}")


def mp_config(raw: Mapping[str, Any] | None, url: str | None, sets: Mapping[str, Any]) -> Generated:
    """An ``--l2-adapter`` spec for the kvstore L2 adapter, from a URL, an L2 spec or an LMCache file."""
    spec: dict[str, Any] = dict(L2_PLUGIN)
    out = Generated(spec, "mp")
    top: dict[str, Any] = {}
    if raw is None:
        params: dict[str, Any] = {}
    elif is_l2_spec(raw):
        params = _l2_params(raw, out.changes)
        for name, value in raw.items():
            if name in L2_PLUGIN and raw.get("type") == "plugin" and value != L2_PLUGIN[name]:
                out.changes.append(f"{name}: {value!r} -> {L2_PLUGIN[name]!r}")
            elif name in L2_FRAMEWORK_KEYS or (raw.get("type") == "plugin" and name not in L2_PLUGIN and name != "adapter_params"):
                top[name] = value  # kept as written: LMCache reads these beside adapter_params
    else:
        extra_url, params = store_settings(raw)
        params = {k: v for k, v in params.items() if not k.startswith(K.FOREIGN_PREFIXES)}
        if extra_url:
            params["kvstore_url"] = extra_url
    params.update(sets)
    for name in L2_FRAMEWORK_KEYS:
        if name not in params:
            continue
        value = _as_mapping(name, params.pop(name))
        if name in top and top[name] != value:
            raise ConfigError(f"{name!r} is set both at the top level of the spec and inside adapter_params, differently; keep the top-level one")
        if name not in top:
            where = "the command line" if name in sets else "adapter_params"
            out.changes.append(f"{name}: moved from {where} to the top level of the spec (LMCache reads it only there)")
        top[name] = value
    if url:
        if params.get("kvstore_url") and params["kvstore_url"] != url:
            out.changes.append(f"adapter_params.kvstore_url: {params['kvstore_url']} -> {url} (the URL on the command line wins)")
        params["kvstore_url"] = url
    if not params.get("kvstore_url"):
        params.pop("kvstore_url", None)  # s3_endpoint may name the store; never write a null URL
    store = check(params.get("kvstore_url"), params)
    if "eviction" in top:
        validate_eviction(top["eviction"])
        if top["eviction"]["eviction_policy"] in CAPACITY_POLICIES and store.lmcache.capacity_bytes <= 0:
            out.warnings.append("eviction needs max_capacity_gb > 0 in adapter_params: without a capacity LMCache never evicts from this store")
    elif store.lmcache.capacity_bytes > 0:
        out.warnings.append("max_capacity_gb is set but there is no eviction block: LMCache never deletes from this store and it grows without limit")
    spec["adapter_params"] = _public(params, out.withheld)
    spec.update(top)
    return out
