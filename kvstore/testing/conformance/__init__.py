"""A reusable conformance suite for kvstore stores: every backend, every endpoint, one set of cases.

Three ways to run it:

- ``kvstore conformance URL [-c FILE] [--set k=v]`` prints a table and exits non-zero on a failure;
- ``pytest --pyargs kvstore.testing.conformance --kvstore-url URL [--kvstore-config FILE]``;
- from a project's own tests, with any store factory (a callable returning a fresh ``KVStore``
  under a fresh prefix)::

      from kvstore.testing.conformance import CASES, check
      @pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
      def test_conformance(case, my_factory):
          check(case, my_factory)

Cases skip, with the reason, what the backend's ``capabilities`` say it cannot do, and what the
factory's ``skips`` declare its server does not implement.
"""

from kvstore.testing.conformance.cases import CASES, Case, Skip, StoreFactory, case_by_id, iter_cases
from kvstore.testing.conformance.runner import CaseResult, ConformanceRun, declared_skip, run_case, run_cases


def check(case: Case, factory: StoreFactory) -> None:
    """Run one case under pytest: a ``Skip`` becomes ``pytest.skip``, a failure raises."""
    import pytest

    reason = declared_skip(case, factory)
    if reason:
        pytest.skip(reason)
    try:
        case.run(factory)
    except Skip as exc:
        pytest.skip(exc.reason)


__all__ = [
    "CASES", "Case", "CaseResult", "ConformanceRun", "Skip", "StoreFactory", "case_by_id", "check", "declared_skip",
    "iter_cases", "run_case", "run_cases",
]
