"""HTTP status and S3 error codes -> kvstore errors, shared by every S3 backend."""

from __future__ import annotations

import re

from kvstore.errors import AuthError, BucketNotFound, KVStoreError, PreconditionFailed, StoreTimeout, StoreUnavailable

_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
               "AuthorizationHeaderMalformed", "InvalidSecurity", "TokenRefreshRequired"}
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                   "ServiceUnavailable", "InternalError", "RequestTimeout"}
_CODE = re.compile(rb"<Code>([^<]+)</Code>")


def error_code(body: bytes | str | None) -> str | None:
    """The <Code> of an S3 XML error body."""
    if not body:
        return None
    if isinstance(body, str):
        body = body.encode("utf-8", "replace")
    match = _CODE.search(body)
    return match.group(1).decode("utf-8", "replace") if match else None


def from_status(status: int, code: str | None, what: str) -> KVStoreError:
    """The kvstore error for an S3 answer that is not a success (404 on an object is a miss, not this)."""
    label = f"{what}: HTTP {status}" + (f" {code}" if code else "")
    if code == "NoSuchBucket":
        return BucketNotFound(label)
    if status in (401, 403) or code in _AUTH_CODES:
        return AuthError(label)
    if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
        return PreconditionFailed(label)
    if status == 408 or code == "RequestTimeout":
        return StoreTimeout(label)
    if status == 429 or status >= 500 or code in _THROTTLE_CODES:
        return StoreUnavailable(label, status=status)
    return StoreUnavailable(label, retryable=False, status=status)
