"""The backend interface, and ``backend_class(name)`` over what ``kvstore.plugins`` discovers.

Backend classes are imported only when a store opens with them, so ``import kvstore`` loads no
client library.
"""

from __future__ import annotations

from kvstore.backends.base import Backend, Capabilities, ObjectInfo, ReadResult


def backend_class(name: str) -> type[Backend]:
    """The class of the installed backend ``name``; ``BackendUnavailable`` names what to install."""
    from kvstore import plugins

    return plugins.backend_class(name)


__all__ = ["Backend", "Capabilities", "ObjectInfo", "ReadResult", "backend_class"]
