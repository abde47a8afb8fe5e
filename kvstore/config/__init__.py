"""Configuration: the key table, the profiles, the resolved data and ``resolve``."""

from kvstore.config.lmcache import LMCacheOptions
from kvstore.config.model import Credentials, Secret, StoreConfig
from kvstore.config.resolve import resolve

__all__ = ["Credentials", "LMCacheOptions", "Secret", "StoreConfig", "resolve"]
