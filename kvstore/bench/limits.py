"""This machine's ceilings, measured in the same run as the clients: loopback TCP and memcpy."""

from __future__ import annotations

import os
import socket
import threading
import time

GIB = 1 << 30


def loopback_tcp(streams: int = 1, seconds: float = 1.0, chunk: int = 1 << 20) -> float:
    """Bytes per second pushed through ``streams`` loopback TCP connections at once for about ``seconds``."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=streams)
    port = listener.getsockname()[1]
    received = [0] * streams
    deadline = time.perf_counter() + seconds

    def sink(i: int) -> None:
        conn, _ = listener.accept()
        buf = memoryview(bytearray(chunk))
        total = 0
        with conn:
            while n := conn.recv_into(buf):
                total += n
        received[i] = total

    def source() -> None:
        data = memoryview(bytes(chunk))
        with socket.create_connection(("127.0.0.1", port)) as conn:
            while time.perf_counter() < deadline:
                conn.sendall(data)

    sinks = [threading.Thread(target=sink, args=(i,)) for i in range(streams)]
    sources = [threading.Thread(target=source) for _ in range(streams)]
    start = time.perf_counter()
    for t in sinks + sources:
        t.start()
    for t in sources + sinks:
        t.join()
    elapsed = time.perf_counter() - start
    listener.close()
    return sum(received) / elapsed


def memcpy(size: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes per second of a numpy copy of ``size`` bytes (best of ``repeats``)."""
    import numpy as np

    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return size / best


def cores() -> int:
    """CPUs this process may run on (client and a local server share them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def measure(concurrency: int) -> dict[str, float]:
    """Every ceiling in bytes per second: one TCP stream, ``concurrency`` streams, memcpy."""
    return {
        "tcp_one_stream": loopback_tcp(1),
        "tcp_concurrent": loopback_tcp(concurrency),
        "memcpy": memcpy(),
    }
