"""Running the cases without pytest: a store factory under a fresh prefix, results, reports.

``ConformanceRun(url, extra_config)`` is the factory the CLI and the pytest plugin hand to the
cases: every call opens a store under ``<configured prefix>/kvstore-conformance-<random>/<n>``,
and ``cleanup()`` deletes everything under that run prefix and closes the stores.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any
from xml.etree import ElementTree

import kvstore
from kvstore.config import StoreConfig
from kvstore.kv.concurrency import windows
from kvstore.store import KVStore
from kvstore.testing.conformance.cases import Case, Skip, StoreFactory

PASS, FAIL, SKIP = "pass", "fail", "skip"


class ConformanceRun:
    """A store factory: each call is a fresh ``KVStore`` under a fresh prefix of one run prefix.

    ``skips`` maps case ids to the reason they cannot pass against this endpoint (what its server
    does not implement); those cases skip with that reason instead of running.
    """

    def __init__(self, url: str | None = None, extra_config: Mapping[str, Any] | None = None,
                 *, config: StoreConfig | None = None, skips: Mapping[str, str] | None = None) -> None:
        self.config = config if config is not None else kvstore.resolve(url, extra_config)
        self.skips = dict(skips or {})
        base = self.config.prefix.strip("/")
        self.run_prefix = "/".join(p for p in (base, f"kvstore-conformance-{uuid.uuid4().hex[:12]}") if p)
        self._count = 0

    def __call__(self) -> KVStore:
        self._count += 1
        return kvstore.open_config(self.config.with_overrides(prefix=f"{self.run_prefix}/{self._count}"))

    def cleanup(self) -> int:
        """Delete every object under the run prefix; how many were deleted."""
        with kvstore.open_config(self.config.with_overrides(prefix=self.run_prefix)) as store:
            if not store.backend.capabilities.listing:
                return 0
            deleted = 0
            for keys in windows(store.list(), 1000):  # a page at a time: a run may leave any number behind
                store.discard_many(keys)
                deleted += len(keys)
            return deleted


@dataclass(frozen=True)
class CaseResult:
    case: str
    outcome: str  # pass, fail or skip
    seconds: float
    detail: str = ""  # the skip reason or the failure


def declared_skip(case: Case, factory: StoreFactory) -> str | None:
    """The reason the factory declares ``case`` cannot pass (its ``skips``), or None."""
    skips = getattr(factory, "skips", None) or {}
    return skips.get(case.id)


def run_case(case: Case, factory: StoreFactory) -> CaseResult:
    """Run one case; a failure is reported, never raised."""
    started = time.monotonic()
    reason = declared_skip(case, factory)
    if reason:
        return CaseResult(case.id, SKIP, 0.0, reason)
    try:
        case.run(factory)
    except Skip as exc:
        return CaseResult(case.id, SKIP, time.monotonic() - started, exc.reason)
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else _where(exc)
        return CaseResult(case.id, FAIL, time.monotonic() - started, detail)
    return CaseResult(case.id, PASS, time.monotonic() - started)


def _where(exc: BaseException) -> str:
    """A bare assert says nothing: name the failing line instead."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__} at {frame.name}: {frame.line}"


def run_cases(cases: Iterable[Case], factory: ConformanceRun, *, progress=None) -> list[CaseResult]:
    """Run ``cases`` in order against ``factory``, then remove what they wrote.

    A failed removal is reported as one more failing result, ``cleanup``.
    """
    results = []
    for case in cases:
        result = run_case(case, factory)
        results.append(result)
        if progress is not None:
            progress(result)
    started = time.monotonic()
    try:
        factory.cleanup()
    except Exception as exc:
        results.append(CaseResult("cleanup", FAIL, time.monotonic() - started, f"{type(exc).__name__}: {exc}"))
    return results


def failed(results: Iterable[CaseResult]) -> list[CaseResult]:
    return [r for r in results if r.outcome == FAIL]


def to_json(target: str, results: list[CaseResult]) -> dict[str, Any]:
    counts = {o: sum(r.outcome == o for r in results) for o in (PASS, FAIL, SKIP)}
    return {"target": target, "counts": counts, "results": [asdict(r) for r in results]}


def to_junit(target: str, results: list[CaseResult]) -> str:
    """A JUnit XML report (one testsuite; one testcase per case)."""
    suite = ElementTree.Element("testsuite", {
        "name": "kvstore-conformance",
        "tests": str(len(results)),
        "failures": str(len(failed(results))),
        "skipped": str(sum(r.outcome == SKIP for r in results)),
        "time": f"{sum(r.seconds for r in results):.3f}",
    })
    for r in results:
        testcase = ElementTree.SubElement(suite, "testcase", {"classname": target, "name": r.case, "time": f"{r.seconds:.3f}"})
        if r.outcome == FAIL:
            ElementTree.SubElement(testcase, "failure", {"message": r.detail})
        elif r.outcome == SKIP:
            ElementTree.SubElement(testcase, "skipped", {"message": r.detail})
    return ElementTree.tostring(suite, encoding="unicode", xml_declaration=True)
