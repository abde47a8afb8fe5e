"""How many threads a store holds while many reads are in flight, per backend and API.

``python -m kvstore.bench.threads [--inflight 256] [--size 1MiB]`` reads objects from the null
endpoint through each installed S3 backend, 256 at once through ``aget_into`` on one event loop
and through ``get_into_many``, and prints the process's OS threads: before the store opened,
once it is open, and the most seen while the reads ran. The objects are written through the
asyncio API first, so that the asyncio figure holds no thread the blocking API started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from typing import Any


def measure(backend: str, url: str, extra: dict[str, Any], inflight: int, size: int) -> dict[str, Any]:
    """Threads before, open and at the peak of ``inflight`` reads, through the async and the sync API."""
    import kvstore
    from kvstore.bench.null_endpoint import payload
    from kvstore.bench.runner import PeakRss, os_threads

    before = os_threads()
    config = extra | {"kvstore_backend": backend, "kvstore_max_inflight": inflight}
    with kvstore.open(url, config) as store:
        keys = [f"t/{i:04d}" for i in range(inflight)]
        data = payload(size)  # what the null endpoint serves back, so checksums hold
        opened = os_threads()
        buffers = [bytearray(size) for _ in keys]

        async def reads() -> list[int | None]:
            return list(await asyncio.gather(*(store.aget_into(k, b) for k, b in zip(keys, buffers))))

        with PeakRss() as async_peak:
            asyncio.run(store.aput_many((k, data) for k in keys))
            start = time.perf_counter()
            assert asyncio.run(reads()) == [size] * inflight
            async_s = time.perf_counter() - start
        with PeakRss() as sync_peak:
            start = time.perf_counter()
            assert store.get_into_many(keys, buffers) == [size] * inflight
            sync_s = time.perf_counter() - start
    return {"backend": backend, "inflight": inflight, "before_open": before, "open": opened,
            "peak_async": async_peak.threads, "peak_sync": sync_peak.threads,
            "async_s": round(async_s, 3), "sync_s": round(sync_s, 3)}


def main(argv: list[str] | None = None) -> None:
    from kvstore import plugins
    from kvstore.bench.null_endpoint import NullEndpoint
    from kvstore.config.keys import parse_size

    parser = argparse.ArgumentParser(prog="python -m kvstore.bench.threads", description=__doc__.splitlines()[0])
    parser.add_argument("--inflight", type=int, default=256)
    parser.add_argument("--size", default="1MiB")
    parser.add_argument("--backends", default=None, help="comma-separated (default: every installed S3 backend)")
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)  # a running null endpoint: measure one backend here
    args = parser.parse_args(argv)
    s3 = set(plugins.S3_PROFILES)
    names = args.backends.split(",") if args.backends else [p.name for p in plugins.by_priority() if s3 & set(p.serves)]
    if args.endpoint:  # one backend, in a process of its own, so no other client's threads are counted
        extra = {**NullEndpoint.config_for(args.endpoint)}
        print(json.dumps(measure(names[0], "s3://threads", extra, args.inflight, parse_size(args.size))), flush=True)
        return
    with NullEndpoint() as null:
        for name in names:
            subprocess.run([sys.executable, "-m", "kvstore.bench.threads", "--backends", name, "--endpoint", null.endpoint,
                            "--inflight", str(args.inflight), "--size", args.size], check=True)


if __name__ == "__main__":
    main()
