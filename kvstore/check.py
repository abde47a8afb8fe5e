"""``kvstore check``: prove a configuration works before an engine depends on it.

A wrong key inside a running LMCache costs every lookup and leaves only a log line. The probe
runs each step LMCache's adapters rely on (resolve, connect, write, read back, stat, list,
delete) against one object under a random name, records what failed and why, and always tries
to remove its object, even when a later step fails.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from kvstore.cli.common import EXIT_FAILED, EXIT_OK, exit_code_for
from kvstore.errors import AuthError, BucketNotFound, IntegrityError

if TYPE_CHECKING:
    from kvstore.config import StoreConfig
    from kvstore.store import KVStore

STEPS = ("resolve", "connect", "write", "read", "stat", "list", "delete")
PROBE_SIZE = 4096
PROBE_PREFIX = "kvstore-check-"


@dataclass
class Step:
    """One step's outcome: ``ok``, ``fail`` or ``skipped``."""

    step: str
    status: str = "skipped"
    detail: str = ""
    error: str | None = None  # the exception's type name
    seconds: float = 0.0
    exit_code: int = EXIT_OK

    def line(self) -> str:
        head = f"{self.step:<8} {self.status.upper() if self.status == 'fail' else self.status:<7}"
        why = f"{self.error}: {self.detail}" if self.error else self.detail
        timing = f" ({self.seconds * 1000:.0f} ms)" if self.status != "skipped" else ""
        return f"{head} {why}{timing}".rstrip()


class WrongAnswer(Exception):
    """The store answered, but not what was written (exit 1, not a store error)."""


@dataclass
class Report:
    """All steps of one probe and the exit code they add up to."""

    store: str = ""
    probe: str = ""
    steps: list[Step] = field(default_factory=list)  # a "cleanup" step follows when the probe object may remain

    @property
    def exit_code(self) -> int:
        return next((s.exit_code for s in self.steps if s.status == "fail"), EXIT_OK)

    @property
    def ok(self) -> bool:
        return all(s.status == "ok" for s in self.steps)

    def lines(self) -> list[str]:
        out = [s.line() for s in self.steps]
        failed = next((s for s in self.steps if s.status == "fail"), None)
        verdict = f"all {len(self.steps)} steps passed" if failed is None else f"failed at {failed.step}"
        out.append(f"{verdict} ({self.store or 'no store'})")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "exit_code": self.exit_code, "store": self.store, "probe": self.probe,
                "steps": [{**asdict(s), "seconds": round(s.seconds, 4)} for s in self.steps]}


def _code_for(exc: BaseException) -> int:
    # A checksum mismatch is the store answering wrongly, as a differing read back is: exit 1, not 3.
    return EXIT_FAILED if isinstance(exc, (WrongAnswer, IntegrityError)) else exit_code_for(exc)


def _describe(config: StoreConfig) -> str:
    if not config.is_s3:
        return f"{config.url} ({config.backend} backend)"
    where = config.endpoint or "default endpoint"
    return (f"{config.url}: bucket {config.bucket!r} at {where}, region {config.region or '-'}, "
            f"{config.addressing or '-'} addressing, {config.backend} backend, credentials {config.credentials.describe()}")


def config_failure(exc: Exception) -> Report:
    """The report of a configuration that could not even be read: its resolve step failed, the rest skipped."""
    report = Report(steps=[Step(s) for s in STEPS])
    first = report.steps[0]
    first.status, first.error, first.detail, first.exit_code = "fail", type(exc).__name__, str(exc), _code_for(exc)
    return report


def _hint(exc: BaseException, config: StoreConfig | None) -> str:
    """What the store error is about, in the user's terms (the backend's message may not say)."""
    if config is None or not config.is_s3:
        return ""
    where = config.endpoint or "the default endpoint"
    if isinstance(exc, BucketNotFound):
        return f" (bucket {config.bucket!r} does not exist at {where}; create it or fix the URL)"
    if isinstance(exc, AuthError):
        return f" ({where} rejected credentials {config.credentials.describe()} for bucket {config.bucket!r})"
    return ""


def probe(url: str | None, extra: Mapping[str, Any], *, name: str | None = None,
          before_step: Callable[[str], None] | None = None) -> Report:
    """Run every step against one probe object; stop at the first store error, always clean up.

    ``before_step`` is called with each step's name before it runs (progress, or a test's fault switch).
    """
    import kvstore

    report = Report(probe=name or f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    report.steps = [Step(s) for s in STEPS]
    steps = {s.step: s for s in report.steps}
    payload = os.urandom(PROBE_SIZE)
    state: dict[str, Any] = {}

    def run(step: str, fn: Callable[[], str]) -> bool:
        record = steps[step]
        if before_step is not None:
            before_step(step)
        start = time.perf_counter()
        try:
            record.detail = fn()
            record.status = "ok"
        except Exception as exc:  # every failure becomes this step's line
            record.status, record.error, record.detail = "fail", type(exc).__name__, str(exc) + _hint(exc, state.get("config"))
            record.exit_code = _code_for(exc)
        record.seconds = time.perf_counter() - start
        return record.status == "ok"

    def do_resolve() -> str:
        state["config"] = config = kvstore.resolve(url, extra)
        report.store = config.url
        return _describe(config)

    if not run("resolve", do_resolve):
        return report
    store = kvstore.open_config(state["config"])
    written = False
    try:
        def do_connect() -> str:
            # A listing needs the bucket and valid credentials, and S3 says which one is wrong.
            found = list(store.list(report.probe))
            if found:
                raise WrongAnswer(f"{len(found)} object(s) already named {report.probe!r}")
            reached = "bucket reachable, credentials accepted" if state["config"].is_s3 else "store reachable"
            return f"listed {state['config'].url} ({reached})"

        def do_write() -> str:
            nonlocal written
            written = True  # from here on the object may exist, even if put raises (a lost response)
            store.put(report.probe, payload, {"probe": "kvstore-check"})
            return f"put {report.probe} ({PROBE_SIZE} bytes)"

        def do_read() -> str:
            data = store.get(report.probe)
            if data is None:
                raise WrongAnswer(f"{report.probe} is not there right after it was written")
            if data != payload:
                diff = next((i for i, (a, b) in enumerate(zip(data, payload)) if a != b), min(len(data), len(payload)))
                raise WrongAnswer(f"read back {len(data)} bytes that differ from the {PROBE_SIZE} written (first at byte {diff})")
            return f"{PROBE_SIZE} bytes read back match"

        def do_stat() -> str:
            info = store.stat(report.probe)
            if info is None:
                raise WrongAnswer(f"stat finds no {report.probe}")
            if info.size != PROBE_SIZE:
                raise WrongAnswer(f"stat says {info.size} bytes, {PROBE_SIZE} were written")
            if info.metadata.get("probe") != "kvstore-check":
                raise WrongAnswer(f"object metadata not kept (got {dict(info.metadata)})")
            return f"size {info.size}, metadata kept"

        def do_list() -> str:
            found = list(store.list(PROBE_PREFIX))
            if report.probe not in found:
                raise WrongAnswer(f"listing {PROBE_PREFIX!r} does not show {report.probe}")
            return f"listing shows {report.probe}"

        def do_delete() -> str:
            nonlocal written
            store.delete(report.probe)
            if store.stat(report.probe) is not None:
                raise WrongAnswer(f"{report.probe} is still there after delete")
            written = False
            return f"deleted {report.probe}"

        for step, fn in (("connect", do_connect), ("write", do_write), ("read", do_read), ("stat", do_stat),
                         ("list", do_list), ("delete", do_delete)):
            ok = run(step, fn)
            # A wrong answer leaves the store usable, so the later steps still say what works;
            # a store error (auth, bucket, network) would fail them all the same way.
            if not ok and steps[step].exit_code != EXIT_FAILED:
                break
            if not ok and step == "connect":
                break
    finally:
        _cleanup(store, report, written)
        store.close()
    return report


def _cleanup(store: KVStore, report: Report, written: bool) -> None:
    """Remove the probe object if a step may have left it, as one more step of the report."""
    write = next(s for s in report.steps if s.step == "write")
    if not written or write.error in (AuthError.__name__, BucketNotFound.__name__):
        return  # never written, or refused before anything was stored
    step = Step("cleanup")
    start = time.perf_counter()
    try:
        store.delete(report.probe)
        step.status, step.detail = "ok", f"removed {report.probe}"
    except Exception as exc:  # reported, never raised: the steps above carry the first failure
        step.status, step.error = "fail", type(exc).__name__
        step.detail, step.exit_code = f"{exc}; {report.probe} may remain: remove it by hand", _code_for(exc)
    step.seconds = time.perf_counter() - start
    report.steps.append(step)
