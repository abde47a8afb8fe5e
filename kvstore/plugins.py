"""Backend discovery: the embedded backends, and every distribution in the ``kvstore.backends`` group.

A backend distribution declares an entry point whose object is a ``BackendPlugin``::

    [project.entry-points."kvstore.backends"]
    toy = "kvstore_toy:PLUGIN"

The plugin describes itself without importing its client library (names, profiles, config keys,
capabilities, how to install it); the backend class is imported only when a store opens with it.
Nothing in the core names a network backend: profiles get their default backend from here.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, cast

from kvstore.config.keys import OWN_PREFIXES, Key
from kvstore.config.profiles import PROFILES, Profile
from kvstore.errors import BackendUnavailable, ConfigError

if TYPE_CHECKING:
    from kvstore.backends.base import Backend, Capabilities

GROUP = "kvstore.backends"
S3_PROFILES: tuple[str, ...] = tuple(name for name, profile in PROFILES.items() if profile.is_s3)
"""The core's S3 profiles, for backends that serve them all."""
_log = logging.getLogger("kvstore")


@dataclass(frozen=True)
class BackendPlugin:
    """What a backend tells the core about itself.

    ``serves`` lists the profiles it can serve; among the installed backends that serve a
    profile, the one with the highest ``priority`` is that profile's default. ``profiles`` are
    profiles it adds (with ``schemes`` naming the URL schemes that select them), ``keys`` the
    extra_config keys it adds; their values reach the backend as ``config.options``.
    """

    name: str
    load: str  # "package.module:Class", imported when a store opens
    serves: tuple[str, ...]
    priority: int = 0
    capabilities: Capabilities | None = None
    keys: tuple[Key, ...] = ()
    profiles: tuple[Profile, ...] = ()
    schemes: Callable[[], Iterable[str]] | None = None
    proxy: bool = True  # can it send requests through s3_proxy_url
    distribution: str = ""  # the pip name that installs it
    doc: str = ""
    origin: str = field(default="", compare=False)  # filled in on discovery: the entry point's distribution

    def backend_class(self) -> type[Backend]:
        """Import the backend class; a missing client library is ``BackendUnavailable`` with the pip hint."""
        module_name, _, class_name = self.load.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise BackendUnavailable(self.name, exc.name or module_name, self.install_hint) from exc
        return cast("type[Backend]", getattr(module, class_name))

    @property
    def install_hint(self) -> str:
        return f"pip install {self.distribution or self.origin or 'the distribution that provides it'}"


def _embedded() -> tuple[BackendPlugin, ...]:
    from kvstore.backends.base import Capabilities

    return (
        BackendPlugin("memory", "kvstore.backends.memory:MemoryBackend", ("memory",), 100,
                      Capabilities(conditional_put=True), distribution="kvcache-store", origin="kvcache-store",
                      doc="Process-local memory (embedded)."),
        BackendPlugin("file", "kvstore.backends.file:FileBackend", ("file",), 100,
                      Capabilities(conditional_put=True), distribution="kvcache-store", origin="kvcache-store",
                      doc="A local directory (embedded)."),
    )


def _check(plugin: object, where: str, taken: dict[str, BackendPlugin]) -> BackendPlugin | None:
    if not isinstance(plugin, BackendPlugin):
        _log.warning("kvstore backend entry point %s is not a BackendPlugin (%s): ignored", where, type(plugin).__name__)
        return None
    if plugin.name in taken:
        _log.warning("kvstore backend %r from %s is already provided by %s: ignored", plugin.name, where,
                     taken[plugin.name].origin)
        return None
    for key in plugin.keys:
        if not key.name.startswith(OWN_PREFIXES) and not key.name.startswith(f"{plugin.name}_"):
            _log.warning("kvstore backend %r: key %r must start with %r: ignored", plugin.name, key.name,
                         f"{plugin.name}_")
            return None
    return plugin


@functools.lru_cache(maxsize=1)
def _discover() -> tuple[dict[str, BackendPlugin], tuple[tuple[str, str], ...]]:
    found: dict[str, BackendPlugin] = {p.name: p for p in _embedded()}
    broken: list[tuple[str, str]] = []
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        where = f"{ep.name} = {ep.value}"
        try:
            loaded = ep.load()
        except Exception as exc:  # a broken plugin must not break every other store
            _log.warning("kvstore backend %s cannot be loaded: %s: %s", where, type(exc).__name__, exc)
            broken.append((ep.name, f"{type(exc).__name__}: {exc}"))
            continue
        plugin = _check(loaded, where, found)
        if plugin is not None:
            dist = getattr(ep, "dist", None)
            origin = f"{dist.name} {dist.version}" if dist is not None else ep.value
            found[plugin.name] = replace(plugin, origin=origin)
    return found, tuple(broken)


def refresh() -> None:
    """Forget what was discovered (after installing a backend in a running process)."""
    _discover.cache_clear()


def installed() -> dict[str, BackendPlugin]:
    """Every usable backend by name, the embedded ones included."""
    return dict(_discover()[0])


def broken() -> tuple[tuple[str, str], ...]:
    """(name, why) of the entry points that could not be loaded."""
    return _discover()[1]


def plugin(name: str) -> BackendPlugin:
    """The backend called ``name``; a ``ConfigError`` that lists what is installed otherwise."""
    found = installed()
    if name in found:
        return found[name]
    why = dict(broken()).get(name)
    if why:
        raise ConfigError(f"backend {name!r} is installed but cannot be loaded ({why})", key="kvstore_backend")
    raise ConfigError(f"no backend {name!r} is installed (installed: {', '.join(sorted(found))}): install the "
                      f"distribution that provides it (the project's own: pip install 'kvcache-store[all]')",
                      key="kvstore_backend")


def backend_class(name: str) -> type[Backend]:
    return plugin(name).backend_class()


def by_priority() -> list[BackendPlugin]:
    """Every installed backend, the highest priority first (ties by name)."""
    return sorted(installed().values(), key=lambda p: (-p.priority, p.name))


def serving(profile: str) -> list[BackendPlugin]:
    """The installed backends that can serve ``profile``, the default first."""
    return [p for p in by_priority() if profile in p.serves]


def default_backend(profile: str) -> BackendPlugin:
    candidates = serving(profile)
    if not candidates:
        raise ConfigError(f"no installed backend serves the {profile} profile (installed: "
                          f"{', '.join(sorted(installed()))}): pip install 'kvcache-store[all]'", key="kvstore_backend")
    return candidates[0]


def added_profiles() -> dict[str, tuple[Profile, BackendPlugin]]:
    return {profile.name: (profile, p) for p in installed().values() for profile in p.profiles}


def added_keys() -> dict[str, tuple[Key, BackendPlugin]]:
    return {key.name: (key, p) for p in installed().values() for key in p.keys}


def scheme_profile(scheme: str) -> str | None:
    """The added profile that claims URL scheme ``scheme``, if any installed backend does."""
    for p in installed().values():
        if p.schemes is None or not p.profiles:
            continue
        try:
            claimed = set(p.schemes())
        except Exception:  # a plugin that cannot say claims nothing
            continue
        if scheme in claimed:
            return p.profiles[0].name
    return None
