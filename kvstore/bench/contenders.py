"""The clients under test: kvstore's backends, and each raw client written the way its own docs recommend.

Every contender stores object ``i`` under its own name space and offers ``put(i)``, ``get(i)``,
``get_into(i, buffer)`` and ``exists(i)``. Synchronous contenders are driven from C threads;
asynchronous ones from C coroutines on an event loop of their own (``loop``). A contender that
cannot run here raises from ``open()``; the runner reports the reason instead of a figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlsplit

from kvstore.bench.null_endpoint import payload

if TYPE_CHECKING:
    from kvstore.store import KVStore

BACKENDS = ("crt", "obstore", "fsspec")
BASELINES = ("awscrt", "obstore", "boto3", "s3fs", "lmcache")
RAW_CLIENTS = ("awscrt", "obstore", "boto3", "s3fs")  # what "ratio to the best raw client" compares with


@dataclass(frozen=True)
class Target:
    """The endpoint every contender talks to, as a store URL plus what raw clients need to reach it."""

    url: str
    extra_config: dict[str, Any] = field(repr=False)
    endpoint: str
    bucket: str
    prefix: str
    region: str
    access_key: str | None = field(repr=False)
    secret_key: str | None = field(repr=False)

    @classmethod
    def resolve(cls, url: str, extra_config: dict[str, Any]) -> Target:
        import kvstore

        config = kvstore.resolve(url, extra_config)
        secret = config.credentials.secret_access_key
        return cls(url=url, extra_config=dict(extra_config), endpoint=config.base_endpoint, bucket=config.bucket,
                   prefix=config.prefix.strip("/"), region=config.region or "us-east-1",
                   access_key=config.credentials.access_key_id, secret_key=secret.reveal() if secret else None)

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.endpoint)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def tls(self) -> bool:
        return self.endpoint.startswith("https:")


class Contender:
    """One client: ``family`` is "kvstore", "raw" or "connector"."""

    family: ClassVar[str] = "raw"
    asynchronous: ClassVar[bool] = False

    def __init__(self, name: str, target: Target, size: int, concurrency: int) -> None:
        self.name = name
        self.target = target
        self.size = size
        self.concurrency = concurrency
        self.data = payload(size)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None

    def object_name(self, i: int) -> str:
        """The object name (without bucket) that object ``i`` of this contender is stored under."""
        key = f"bench-{self.name}/{i:06d}"
        return f"{self.target.prefix}/{key}" if self.target.prefix else key

    def open(self) -> None:
        """Build the client; raise with a readable reason when it cannot run here."""

    def close(self) -> None:
        if self.loop is not None:
            if self.loop.is_running():
                # Whatever still waits on the loop (a client's worker tasks) is cancelled and let end
                # there first: a loop stopped under pending tasks reports each "destroyed but pending".
                with contextlib.suppress(Exception):
                    self.run_on_loop(_cancel_pending(), 5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self._loop_thread:
                self._loop_thread.join(5)
            if not self.loop.is_running() and not self.loop.is_closed():
                self.loop.close()

    def _start_loop(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name=f"bench-{self.name}", daemon=True)
        self._loop_thread.start()

    def run_on_loop(self, coro: Any, timeout: float | None = None) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def operation(self, op: str) -> Callable[..., Any]:
        """The callable for ``op``: ``fn(i, buffer)``, sync or a coroutine function."""
        fn = getattr(self, op, None)
        if fn is None:
            raise NotImplementedError(f"{self.name} has no {op}")
        return fn


class KVStoreContender(Contender):
    """kvstore itself, through ``kvstore.open`` with one backend forced."""

    family = "kvstore"

    def __init__(self, backend: str, target: Target, size: int, concurrency: int) -> None:
        super().__init__(f"kvstore-{backend}", target, size, concurrency)
        self.backend = backend
        self.store: KVStore | None = None

    def open(self) -> None:
        import kvstore

        extra = self.target.extra_config | {"kvstore_backend": self.backend, "kvstore_max_inflight": self.concurrency}
        self.store = kvstore.open(self.target.url, extra)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    @property
    def _store(self) -> KVStore:
        assert self.store is not None, f"{self.name} is not open"
        return self.store

    def _key(self, i: int) -> str:
        return f"bench-{self.name}/{i:06d}"

    def put(self, i: int, buffer: Any = None) -> None:
        self._store.put(self._key(i), self.data)

    def get(self, i: int, buffer: Any = None) -> int | None:
        data = self._store.get(self._key(i))
        return None if data is None else len(data)  # a missing object: the runner's check reports it

    def get_into(self, i: int, buffer: Any) -> int | None:
        return self._store.get_into(self._key(i), buffer)

    def exists(self, i: int, buffer: Any = None) -> bool:
        return self._store.exists(self._key(i))


class KVStoreAsyncContender(KVStoreContender):
    """kvstore through its asyncio API, awaited on an event loop as LMCache's connector does."""

    asynchronous = True

    def __init__(self, backend: str, target: Target, size: int, concurrency: int) -> None:
        super().__init__(backend, target, size, concurrency)
        self.name = f"kvstore-{backend}-async"

    def open(self) -> None:
        super().open()
        self._start_loop()

    def close(self) -> None:
        KVStoreContender.close(self)
        Contender.close(self)

    async def put(self, i: int, buffer: Any = None) -> None:  # type: ignore[override]
        await self._store.aput(self._key(i), self.data)

    async def get(self, i: int, buffer: Any = None) -> int | None:  # type: ignore[override]
        data = await self._store.aget(self._key(i))
        return None if data is None else len(data)  # a missing object: the runner's check reports it

    async def get_into(self, i: int, buffer: Any) -> int | None:  # type: ignore[override]
        return await self._store.aget_into(self._key(i), buffer)

    async def exists(self, i: int, buffer: Any = None) -> bool:  # type: ignore[override]
        return await self._store.aexists(self._key(i))


class AwscrtContender(Contender):
    """awscrt's S3Client: one client, GET_OBJECT / PUT_OBJECT, ``on_body`` into a preallocated buffer."""

    asynchronous = True

    def open(self) -> None:
        from awscrt import auth, io, s3

        self._s3 = s3
        group = io.EventLoopGroup(0)
        bootstrap = io.ClientBootstrap(group, io.DefaultHostResolver(group))
        if self.target.access_key and self.target.secret_key:
            credentials = auth.AwsCredentialsProvider.new_static(self.target.access_key, self.target.secret_key)
        else:
            credentials = auth.AwsCredentialsProvider.new_default_chain(bootstrap)
        self.client = s3.S3Client(
            bootstrap=bootstrap, region=self.target.region, credential_provider=credentials,
            tls_mode=s3.S3RequestTlsMode.ENABLED if self.target.tls else s3.S3RequestTlsMode.DISABLED,
            part_size=8 << 20,
        )
        self.host_header = urlsplit(self.target.endpoint).netloc
        self._start_loop()

    def _request(self, method: str, i: int, **kwargs: Any):
        from awscrt.http import HttpHeaders, HttpRequest

        headers = HttpHeaders([("Host", self.host_header)])
        body = kwargs.pop("body", None)
        if body is not None:
            import io as stdio

            headers.add("Content-Length", str(len(body)))
            headers.add("Content-Type", "application/octet-stream")
            body = stdio.BytesIO(body)
        path = f"/{self.target.bucket}/{quote(self.object_name(i))}"
        request = HttpRequest(method, path, headers, body)
        return self.client.make_request(request=request, **kwargs)

    async def put(self, i: int, buffer: Any = None) -> None:
        s3_request = self._request("PUT", i, type=self._s3.S3RequestType.PUT_OBJECT, body=self.data)
        await asyncio.wrap_future(s3_request.finished_future)

    async def get_into(self, i: int, buffer: Any) -> int:
        view = memoryview(buffer)
        received = [0]

        def on_body(chunk: bytes, offset: int, **_: Any) -> None:
            view[offset:offset + len(chunk)] = chunk
            received[0] += len(chunk)

        s3_request = self._request("GET", i, type=self._s3.S3RequestType.GET_OBJECT, on_body=on_body)
        await asyncio.wrap_future(s3_request.finished_future)
        return received[0]

    async def get(self, i: int, buffer: Any = None) -> int:
        chunks: dict[int, bytes] = {}

        def on_body(chunk: bytes, offset: int, **_: Any) -> None:
            chunks[offset] = chunk

        s3_request = self._request("GET", i, type=self._s3.S3RequestType.GET_OBJECT, on_body=on_body)
        await asyncio.wrap_future(s3_request.finished_future)
        return len(b"".join(chunks[k] for k in sorted(chunks)))

    async def exists(self, i: int, buffer: Any = None) -> bool:
        s3_request = self._request("HEAD", i, type=self._s3.S3RequestType.DEFAULT, operation_name="HeadObject")
        try:
            await asyncio.wrap_future(s3_request.finished_future)
        except self._s3.S3ResponseError as exc:
            if exc.status_code == 404:
                return False
            raise
        return True


class ObstoreContender(Contender):
    """obstore's async API: ``put_async``, ``get_async(...).bytes_async()``, ``head_async``."""

    asynchronous = True

    def open(self) -> None:
        import obstore
        from obstore.store import S3Store

        self._obstore = obstore
        self.store = S3Store(
            self.target.bucket, endpoint=self.target.endpoint, region=self.target.region,
            access_key_id=self.target.access_key, secret_access_key=self.target.secret_key,
            virtual_hosted_style_request=False, client_options={"allow_http": not self.target.tls},
        )
        self._start_loop()

    async def put(self, i: int, buffer: Any = None) -> None:
        await self._obstore.put_async(self.store, self.object_name(i), self.data)

    async def get(self, i: int, buffer: Any = None) -> int:
        response = await self._obstore.get_async(self.store, self.object_name(i))
        return len(await response.bytes_async())

    async def get_into(self, i: int, buffer: Any) -> int:
        response = await self._obstore.get_async(self.store, self.object_name(i))
        data = memoryview(await response.bytes_async())
        memoryview(buffer)[: len(data)] = data
        return len(data)

    async def exists(self, i: int, buffer: Any = None) -> bool:
        try:
            await self._obstore.head_async(self.store, self.object_name(i))
        except FileNotFoundError:
            return False
        return True


class Boto3Contender(Contender):
    """boto3: one client shared by a thread pool (the driver's C threads)."""

    def open(self) -> None:
        import boto3
        from botocore.config import Config

        self.client = boto3.client(
            "s3", endpoint_url=self.target.endpoint, region_name=self.target.region,
            aws_access_key_id=self.target.access_key, aws_secret_access_key=self.target.secret_key,
            config=Config(max_pool_connections=self.concurrency, s3={"addressing_style": "path"}),
        )

    def put(self, i: int, buffer: Any = None) -> None:
        self.client.put_object(Bucket=self.target.bucket, Key=self.object_name(i), Body=self.data)

    def get(self, i: int, buffer: Any = None) -> int:
        return len(self.client.get_object(Bucket=self.target.bucket, Key=self.object_name(i))["Body"].read())

    def get_into(self, i: int, buffer: Any) -> int:
        data = self.client.get_object(Bucket=self.target.bucket, Key=self.object_name(i))["Body"].read()
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def exists(self, i: int, buffer: Any = None) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.target.bucket, Key=self.object_name(i))
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise
        return True


class S3fsContender(Contender):
    """s3fs's async API (``_pipe_file``, ``_cat_file``, ``_exists``) gathered on one loop."""

    asynchronous = True

    def open(self) -> None:
        import s3fs

        self._start_loop()

        async def make() -> Any:
            fs = s3fs.S3FileSystem(
                key=self.target.access_key, secret=self.target.secret_key, endpoint_url=self.target.endpoint,
                client_kwargs={"region_name": self.target.region}, asynchronous=True, skip_instance_cache=True,
                max_concurrency=self.concurrency,
            )
            await fs.set_session()
            return fs

        self.fs = self.run_on_loop(make(), 30)

    def _path(self, i: int) -> str:
        return f"{self.target.bucket}/{self.object_name(i)}"

    async def put(self, i: int, buffer: Any = None) -> None:
        await self.fs._pipe_file(self._path(i), self.data)

    async def get(self, i: int, buffer: Any = None) -> int:
        return len(await self.fs._cat_file(self._path(i)))

    async def get_into(self, i: int, buffer: Any) -> int:
        data = await self.fs._cat_file(self._path(i))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    async def exists(self, i: int, buffer: Any = None) -> bool:
        self.fs.invalidate_cache(self._path(i))
        return await self.fs._exists(self._path(i))

    def close(self) -> None:
        self.run_on_loop(self.fs.s3.close(), 30)
        super().close()


class LMCacheContender(Contender):
    """LMCache 0.5.6's own S3Connector through its public methods, with a real LocalCPUBackend."""

    family = "connector"
    asynchronous = True

    def open(self) -> None:
        if self.target.tls or self.target.host not in ("127.0.0.1", "localhost", "::1"):
            raise RuntimeError("only set up for a loopback endpoint here")
        host = f"{self.target.bucket}.localhost"
        try:
            socket.create_connection((host, self.target.port), timeout=2).close()
        except OSError:
            raise RuntimeError(f"needs virtual-hosted names: {host} does not reach the endpoint") from None
        if self.size % 64:
            raise RuntimeError("object size must be a multiple of 64 bytes to be one LMCache chunk")
        import torch
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.connector import CreateConnector
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

        chunk_tokens = 16
        # One chunk = 2 (K,V) x 1 layer x 16 tokens x hidden x 2 bytes (bf16) = size bytes.
        kv_shape = (1, 2, chunk_tokens, 1, self.size // (2 * chunk_tokens * 2))
        extra = {"s3_region": self.target.region, "disable_tls": True, "s3_prefer_http2": False,
                 "aws_access_key_id": self.target.access_key, "aws_secret_access_key": self.target.secret_key,
                 "save_chunk_meta": False}
        config = LMCacheEngineConfig.from_legacy(
            chunk_size=chunk_tokens, max_local_cpu_size=(self.size * (2 * self.concurrency + 4)) / (1 << 30),
        )
        config.extra_config = extra
        remote_url = f"s3://{host}:{self.target.port}"
        metadata = LMCacheMetadata(model_name="bench", world_size=1, local_world_size=1, worker_id=0,
                                   local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=kv_shape,
                                   chunk_size=chunk_tokens)
        self._torch = torch
        self.backend = LocalCPUBackend(config, metadata)
        self._start_loop()
        self.connector = CreateConnector(remote_url, self.loop, self.backend, config, metadata)
        inner = getattr(self.connector, "_connector", self.connector)  # shapes live on the S3Connector itself
        self.source = self.backend.allocate(inner.meta_shapes, inner.meta_dtypes, inner.meta_fmt)
        self.source.byte_array.cast("B")[:] = self.data
        self._keys: dict[int, Any] = {}

    def _key(self, i: int) -> Any:
        from lmcache.utils import CacheEngineKey

        if i not in self._keys:
            # A distinct chunk hash per contender and object, so names never collide with the others.
            self._keys[i] = CacheEngineKey("bench", 1, 0, zlib.crc32(self.object_name(i).encode()), self._torch.bfloat16)
        return self._keys[i]

    async def put(self, i: int, buffer: Any = None) -> None:
        self.source.ref_count_up()  # LMCache's wrapper drops one reference per put, as its RemoteBackend expects
        await self.connector.put(self._key(i), self.source)

    async def get(self, i: int, buffer: Any = None) -> int:
        memory_obj = await self.connector.get(self._key(i))
        if memory_obj is None:
            raise RuntimeError("LMCache's S3Connector returned no object")
        size = memory_obj.get_size()
        memory_obj.ref_count_down()
        return size

    async def get_into(self, i: int, buffer: Any) -> int:
        memory_obj = await self.connector.get(self._key(i))
        if memory_obj is None:
            raise RuntimeError("LMCache's S3Connector returned no object")
        size = memory_obj.get_size()
        memoryview(buffer)[:size] = memory_obj.byte_array.cast("B")
        memory_obj.ref_count_down()
        return size

    async def exists(self, i: int, buffer: Any = None) -> bool:
        return await self.connector.exists(self._key(i))

    def close(self) -> None:
        # The connector's own close() deadlocks: it calls its AsyncPQExecutor's blocking shutdown()
        # on the very loop that shutdown waits on. The executor's coroutine is awaited there instead
        # (wait=False: with wait=True it cancels its workers and then waits for them to drain the
        # queue, which never happens); the base class then cancels and ends whatever is left.
        inner = getattr(self, "connector", None)
        inner = getattr(inner, "_connector", inner)
        executor = getattr(inner, "pq_executor", None)
        if executor is not None and self.loop is not None and self.loop.is_running():
            with contextlib.suppress(Exception):
                self.run_on_loop(executor.shutdown_async(wait=False), 5)
        source = getattr(self, "source", None)
        if source is not None:
            source.ref_count_down()  # the allocation's own reference, held since open()
            self.source = None
        super().close()


async def _cancel_pending() -> None:
    """Cancel every other task on the running loop and wait until each has ended."""
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


BASELINE_CLASSES: dict[str, type[Contender]] = {
    "awscrt": AwscrtContender, "obstore": ObstoreContender, "boto3": Boto3Contender,
    "s3fs": S3fsContender, "lmcache": LMCacheContender,
}


APIS = ("sync", "async")


def build(backends: list[str], baselines: list[str], target: Target, size: int, concurrency: int,
          apis: tuple[str, ...] = APIS) -> list[Contender]:
    """Every contender asked for, in the order asked; unknown names are a usage error.

    Each backend runs through each API in ``apis``: the blocking one and the asyncio one.
    """
    from kvstore.errors import ConfigError

    unknown = set(apis) - set(APIS)
    if unknown or not apis:
        raise ConfigError(f"unknown API {', '.join(sorted(unknown)) or '(none)'}; choose from {', '.join(APIS)}")
    out: list[Contender] = []
    for backend in backends:
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if "sync" in apis:
            out.append(KVStoreContender(backend, target, size, concurrency))
        if "async" in apis:
            out.append(KVStoreAsyncContender(backend, target, size, concurrency))
    for name in baselines:
        if name not in BASELINE_CLASSES:
            raise ConfigError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
        out.append(BASELINE_CLASSES[name](name, target, size, concurrency))
    return out
