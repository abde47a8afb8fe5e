"""``S3Server``: where a running test server is and how to sign requests for it (boto3 clients, buckets,
the ``extra_config`` that points kvstore at it), and ``Limit``: what a server does not implement."""

from __future__ import annotations

import contextlib
import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvstore.testing.servers.net import DEFAULT_REGION, LOOPBACK, virtual_hosting_works

__all__ = ["Limit", "S3Server", "ServerUnavailable"]


@dataclass(frozen=True)
class Limit:
    """Something a server does not implement, and the conformance cases that skip because of it."""

    id: str
    what: str  # the skip reason, after the server's name
    cases: tuple[str, ...]


class ServerUnavailable(RuntimeError):
    """The server cannot run on this machine (binary or package missing, ...); the message says why."""


def raise_if_unavailable(reason: str | None) -> None:
    """Raise ``ServerUnavailable(reason)`` unless ``reason`` is None."""
    if reason:
        raise ServerUnavailable(reason)


# boto3 clients with no extra config, per (server, addressing style); dropped when the server stops.
_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()


@dataclass(frozen=True)
class S3Server:
    """Where a running S3 server is and how to sign requests for it."""

    name: str
    host: str
    port: int
    access_key: str
    secret_key: str
    region: str = DEFAULT_REGION
    virtual_host_domain: str | None = None  # "localhost" when BUCKET.localhost:PORT reaches this server

    @classmethod
    def on_loopback(cls, name: str, port: int, access_key: str, secret_key: str,
                    vhost_domain: str = "localhost") -> S3Server:
        """A server listening on 127.0.0.1, virtual-hosted through ``*.<vhost_domain>`` where that resolves."""
        return cls(name=name, host=LOOPBACK, port=port, access_key=access_key, secret_key=secret_key,
                   region=DEFAULT_REGION,
                   virtual_host_domain=vhost_domain if virtual_hosting_works(vhost_domain) else None)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def virtual_endpoint(self) -> str | None:
        """``http://localhost:PORT`` for virtual-hosted clients, or None when that does not resolve."""
        if self.virtual_host_domain is None:
            return None
        return f"http://{self.virtual_host_domain}:{self.port}"

    def client(self, addressing_style: str = "path", **config: Any):
        """A boto3 S3 client for this server (``addressing_style`` "path" or "virtual").

        Clients with no extra config are cached (boto3 clients are thread-safe)."""
        key = (self, addressing_style)
        if not config:
            with _CLIENTS_LOCK:
                c = _CLIENTS.get(key)
            if c is not None:
                return c
        import boto3
        from botocore.config import Config

        if addressing_style == "virtual":
            endpoint = self.virtual_endpoint
            if endpoint is None:
                raise ServerUnavailable(
                    f"virtual-hosted addressing does not work for {self.name} here: "
                    "*.localhost does not resolve to 127.0.0.1 (run scripts/install-test-servers.sh as root)"
                )
        elif addressing_style == "path":
            endpoint = self.endpoint
        else:
            raise ValueError(f"addressing_style must be 'path' or 'virtual', not {addressing_style!r}")
        options: dict[str, Any] = {
            # Directory-bucket names (NAME--AZID--x-s3) would make boto3 ask for an S3 Express
            # session, which these servers do not implement: plain SigV4 is what they speak.
            "s3": {"addressing_style": addressing_style, "disable_s3_express_session_auth": True},
            "retries": {"max_attempts": 3, "mode": "standard"},
            "connect_timeout": 10,
            "read_timeout": 60,
        }
        options.update(config)
        try:
            cfg = Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                **options,
            )
        except TypeError:  # botocore older than 1.36
            cfg = Config(**options)
        c = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=cfg,
        )
        if not config:
            with _CLIENTS_LOCK:
                _CLIENTS[key] = c
        return c

    def create_bucket(self, name: str) -> None:
        """Create ``name``; no error when this user already owns it."""
        from botocore.exceptions import ClientError

        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
            c.head_bucket(Bucket=name)  # raises if it exists but is not ours

    def delete_bucket(self, name: str) -> None:
        """Abort its multipart uploads, delete every object, then the bucket; no error if it is gone."""
        from botocore.exceptions import ClientError

        c = self.client()
        try:
            try:
                for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=name):
                    for up in page.get("Uploads", []) or []:
                        with contextlib.suppress(ClientError):
                            c.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
            except ClientError as e:
                # s3rver cannot list uploads; its unfinished ones do not block DeleteBucket.
                if e.response.get("Error", {}).get("Code", "") != "NotImplemented":
                    raise
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [o["Key"] for o in page.get("Contents", []) or []]
                if not keys:
                    continue
                try:
                    c.delete_objects(
                        Bucket=name, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
                    )
                except ClientError:
                    for k in keys:  # a server that refuses DeleteObjects' checksum flavour
                        c.delete_object(Bucket=name, Key=k)
            # s3rver's DeleteObjects trims the whitespace around a key and reports the trimmed
            # name deleted: whatever is still listed goes one DELETE at a time.
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
                for o in page.get("Contents", []) or []:
                    c.delete_object(Bucket=name, Key=o["Key"])
            c.delete_bucket(Bucket=name)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code", "") != "NoSuchBucket":
                raise

    def extra_config(self, **overrides: Any) -> dict[str, Any]:
        """LMCache-style ``extra_config`` for kvstore pointing at this server (path-style)."""
        cfg: dict[str, Any] = {
            "s3_endpoint_url": self.endpoint,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "s3_region": self.region,
            "s3_addressing_style": "path",
        }
        cfg.update(overrides)
        return cfg

    def url(self, bucket: str, prefix: str = "") -> str:
        """``s3://bucket[/prefix]``: the endpoint travels in ``extra_config()``, so overrides of it
        (a fault proxy, virtual-hosted names) never contradict the URL."""
        prefix = prefix.strip("/")
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


def _signed_probe(server: S3Server) -> Callable[[], bool]:
    """A check that is true when a SigV4-signed ListBuckets with the server's keys succeeds."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5)

    def ok() -> bool:
        try:
            client.list_buckets()
            return True
        except (BotoCoreError, ClientError, OSError):
            return False

    return ok


def forget_clients(server: S3Server | None) -> None:
    """Drop the cached clients of ``server`` (it has stopped)."""
    with _CLIENTS_LOCK:
        for key in [k for k in _CLIENTS if k[0] == server]:
            del _CLIENTS[key]


def boto3_missing() -> str | None:
    """Why the servers cannot be set up and checked here (no boto3), or None."""
    if importlib.util.find_spec("boto3") is None:
        return "boto3 is not installed (needed to set up and check the servers)"
    return None
