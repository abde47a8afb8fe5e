"""``python -m kvstore.testing.servers NAME...``: start servers, print their config, wait for ^C."""

from __future__ import annotations

import contextlib
import json
import sys
import time

from kvstore.testing.servers import SERVER_NAMES, ManagedServer, available, start


def _main(argv: list[str] | None = None) -> int:
    """``python -m kvstore.testing.servers NAME...``: start servers, print their config, wait for ^C."""
    import argparse

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("names", nargs="*", default=["moto"], choices=SERVER_NAMES)
    args = ap.parse_args(argv)
    running: list[ManagedServer] = []
    try:
        for n in args.names:
            reason = available(n)
            if reason:
                print(f"{n}: unavailable: {reason}", file=sys.stderr)
                continue
            srv = start(n)
            running.append(srv)
            assert srv.server is not None, "set once up"
            print(json.dumps({"name": n, "start_seconds": round(srv.start_seconds or 0, 2),
                              "pids": srv.pids, **srv.server.extra_config(),
                              "virtual_endpoint": srv.server.virtual_endpoint}), flush=True)
        if running:
            with contextlib.suppress(KeyboardInterrupt):
                while all(s.alive for s in running):
                    time.sleep(1)
    finally:
        for s in running:
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
