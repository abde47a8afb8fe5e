"""Configuration: the key table, the profiles and ``resolve``."""

from kvstore.config.resolve import Credentials, Secret, StoreConfig, resolve

__all__ = ["Credentials", "Secret", "StoreConfig", "resolve"]
