"""Backend registry: name -> class, imported lazily so ``import kvstore`` loads no client library."""

from __future__ import annotations

import importlib

from kvstore.backends.base import Backend, Capabilities, ObjectInfo, ReadResult
from kvstore.errors import BackendUnavailable

# name: (module, class, the third-party modules it needs, the pip extra that installs them)
REGISTRY: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "memory": ("kvstore.backends.memory", "MemoryBackend", (), ""),
    "file": ("kvstore.backends.file", "FileBackend", (), ""),
    "crt": ("kvstore.backends.crt", "CrtBackend", ("awscrt",), "crt"),
    "obstore": ("kvstore.backends.obstore", "ObstoreBackend", ("obstore",), "obstore"),
    "fsspec": ("kvstore.backends.fsspec", "FsspecBackend", ("fsspec",), "fsspec"),
}


def backend_class(name: str) -> type[Backend]:
    """The backend class for ``name``; ``BackendUnavailable`` names the pip extra when a dependency is missing."""
    module_name, class_name, needs, extra = REGISTRY[name]
    for dependency in needs:
        try:
            importlib.import_module(dependency)
        except ImportError:
            raise BackendUnavailable(name, dependency, extra) from None
    return getattr(importlib.import_module(module_name), class_name)


__all__ = ["REGISTRY", "Backend", "Capabilities", "ObjectInfo", "ReadResult", "backend_class"]
