"""Every conformance case as one pytest test, against the store ``--kvstore-url`` names."""

import pytest

from kvstore.testing.conformance import CASES, check


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_conformance(case, kvstore_factory):
    check(case, kvstore_factory)
