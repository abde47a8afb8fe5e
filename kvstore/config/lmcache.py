"""``LMCacheOptions``: the settings only the LMCache side reads, kept apart from the store's own.

They arrive in the same ``extra_config`` as the store's keys (LMCache hands its plugins one
dict), so ``resolve`` parses and checks them with the rest, and a ``StoreConfig`` carries them
as ``config.lmcache``: whatever holds a store (the adapter, ``kvstore.kv``) names chunks the way
the store was configured. Backends and layers never look at them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from kvstore.errors import ConfigError
from kvstore.naming import LAYOUTS


@dataclass(frozen=True)
class LMCacheOptions:
    """How chunks are named and what the L2 adapter reports; checked when built, so never invalid."""

    key_layout: str = "flat"  # kvstore_key_layout: see kvstore.naming
    # LMCache's own per-chunk header flag: read so that LMCache configs resolve; kvstore keeps
    # object bytes raw whatever it says.
    save_chunk_meta: bool = False
    capacity_bytes: int = 0  # max_capacity_gb: the MP L2 adapter's get_usage capacity (0: untracked)

    def __post_init__(self) -> None:
        if self.key_layout not in LAYOUTS:
            raise ConfigError(f"kvstore_key_layout must be one of {', '.join(LAYOUTS)}, got {self.key_layout!r}",
                              key="kvstore_key_layout")
        if self.capacity_bytes < 0:
            raise ConfigError("max_capacity_gb must not be negative", key="max_capacity_gb")

    def items(self) -> list[tuple[str, Any]]:
        """(field, value) in declaration order, for display."""
        return [(f.name, getattr(self, f.name)) for f in fields(self)]
