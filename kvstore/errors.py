"""The one exception hierarchy of kvstore. A miss is not an error: reads return None."""

from __future__ import annotations


class KVStoreError(Exception):
    """Base class of every error kvstore raises on purpose."""


class ConfigError(KVStoreError, ValueError):
    """A URL or extra_config that cannot be turned into a valid store configuration."""

    def __init__(self, message: str, *, key: str | None = None, suggestion: str | None = None):
        if suggestion:
            message = f"{message} (did you mean {suggestion!r}?)"
        super().__init__(message)
        self.key = key
        self.suggestion = suggestion


class InvalidKey(KVStoreError, ValueError):
    """A key that cannot name an object (empty, too long, control characters)."""


class BufferTooSmall(KVStoreError, ValueError):
    """``get_into`` was given a buffer smaller than the object."""

    def __init__(self, key: str, needed: int, given: int):
        super().__init__(f"buffer of {given} bytes is too small for {key!r} ({needed} bytes)")
        self.needed = needed
        self.given = given


class AuthError(KVStoreError):
    """The endpoint rejected the credentials (403, signature mismatch, unknown key)."""


class BucketNotFound(KVStoreError):
    """The bucket (or root directory) does not exist."""


class StoreTimeout(KVStoreError, TimeoutError):
    """The operation did not finish within its deadline, retries included."""


class StoreUnavailable(KVStoreError):
    """The endpoint could not be reached or kept failing (connection errors, 5xx, open breaker).

    ``retryable`` is True for failures that another attempt may cure (connection reset, 500,
    503 SlowDown, throttling); ``connection`` is True when no HTTP answer came at all.
    """

    def __init__(self, message: str, *, retryable: bool = True, connection: bool = False, status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.connection = connection
        self.status = status


class IntegrityError(KVStoreError):
    """The object read back is not what was written (size or checksum mismatch)."""


class PreconditionFailed(KVStoreError):
    """A conditional put found the object already present."""


class BackendUnavailable(KVStoreError, ImportError):
    """An optional dependency of the chosen backend is not installed.

    ``install`` is either a pip extra of kvcache-store (``"prometheus"``) or a whole command
    (``"pip install ..."``), for backends that come from distributions of their own.
    """

    def __init__(self, backend: str, module: str, install: str):
        hint = install if install.startswith("pip ") else f"pip install 'kvcache-store[{install}]'"
        super().__init__(f"the {backend!r} backend needs the {module!r} package: {hint}")
        self.backend = backend
        self.extra = install
