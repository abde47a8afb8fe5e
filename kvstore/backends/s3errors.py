"""HTTP status and S3 error codes -> kvstore errors, shared by every S3 backend."""

from __future__ import annotations

import re

from kvstore.backends import s3xml
from kvstore.errors import AuthError, BucketNotFound, KVStoreError, PreconditionFailed, StoreTimeout, StoreUnavailable

_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
               "AuthorizationHeaderMalformed", "InvalidSecurity", "TokenRefreshRequired"}
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                   "ServiceUnavailable", "InternalError", "RequestTimeout"}
# The server computed a different checksum of the body it received than the one we sent: the
# bytes were damaged on the way, and sending them again is the cure.
DAMAGED_UPLOAD_CODES = {"BadDigest", "XAmzContentChecksumMismatch", "XAmzContentSHA256Mismatch"}
# A namespace prefix (<s3:Code>) or none; used when the body is not well-formed XML.
_CODE = re.compile(rb"<(?:[\w.-]+:)?Code>([^<]+)</(?:[\w.-]+:)?Code>")


def error_code(body: bytes | str | None) -> str | None:
    """The <Code> of an S3 XML error body, whatever its namespace."""
    if not body:
        return None
    if isinstance(body, str):
        body = body.encode("utf-8", "replace")
    code = s3xml.error_code(body)
    if code:
        return code
    match = _CODE.search(body)
    return match.group(1).decode("utf-8", "replace").strip() if match else None


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
    if code in DAMAGED_UPLOAD_CODES:
        return StoreUnavailable(f"{label}: the server found the upload damaged in transit", status=status)
    if status == 429 or status >= 500 or code in _THROTTLE_CODES:
        return StoreUnavailable(label, status=status)
    return StoreUnavailable(label, retryable=False, status=status)
