"""Shared fixtures: real S3 servers on loopback, started once per session and stopped by PID."""

from __future__ import annotations

import ast
import itertools
import re
import sys
import uuid

import pytest

SERVER_NAMES = ("moto", "seaweedfs", "ceph")


class ServerPool:
    """Starts each server the first time a test asks for it; stops them all at the end."""

    def __init__(self) -> None:
        self._running: dict[str, object] = {}

    def get(self, name: str):
        from kvstore.testing import servers

        if _running and _running[-1].get_closest_marker("servers") is None:
            pytest.fail(f"{_running[-1].nodeid} gets the {name} server without the servers marker (tests/conftest.py)",
                        pytrace=False)
        if name not in self._running:
            reason = servers.available(name)
            if reason:
                pytest.skip(f"{name} cannot run here: {reason}")
            self._running[name] = servers.start(name)
        return self._running[name].server

    def managed(self, name: str):
        self.get(name)
        return self._running[name]

    def stop_all(self) -> None:
        for managed in self._running.values():
            managed.stop()
        self._running.clear()


@pytest.fixture(scope="session")
def s3_servers():
    pool = ServerPool()
    yield pool
    pool.stop_all()


@pytest.fixture
def unique_name():
    """A fresh lowercase name usable as a bucket or a prefix."""
    return lambda stem="t": f"{stem}-{uuid.uuid4().hex[:12]}"


S3_BACKENDS = ["crt", "obstore", "fsspec"]


@pytest.fixture(params=S3_BACKENDS)
def backend(request):
    """Each S3 backend by name, skipped where its client library is not installed."""
    from kvstore.backends import backend_class

    try:
        backend_class(request.param)
    except (ImportError, ModuleNotFoundError) as exc:
        pytest.skip(f"{request.param} backend not available: {exc}")
    return request.param


# -- Test tiers --------------------------------------------------------------------------------------
# Markers (pyproject.toml): ``servers`` (real S3 servers on loopback, and the fault proxy, S3 Express
# gateway and CA in front of them), ``lmcache`` (the lmcache package or torch), ``slow`` (long-running).
# The fast tier is every test with none of them: ``pytest -m "not servers and not lmcache and not slow"``
# (``make test-fast``).  What follows keeps the markers true: a test fails, before its fixtures run,
# when it uses s3_servers or sits in a module that imports the server machinery, lmcache or torch
# without the marker; and a test that gets a server from the pool, or first imports one of those
# inside its body, without the marker fails too (the first import in a process is what shows: the
# fast tier, which does not even import the marked modules, sees every one).

SERVER_FIXTURES = {"s3_servers"}  # the pool every server fixture goes through
SERVER_MODULES = ("kvstore.testing.servers", "kvstore.testing.faults", "kvstore.testing.s3express_gateway",
                  "kvstore.testing.tls")
LMCACHE_MODULES = ("lmcache", "torch", "transformers", "safetensors.torch")
_TIER_ERRORS = pytest.StashKey[list]()
_running: list = []  # the test item being run


def _is_within(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def _module_uses(module, roots: tuple[str, ...]) -> list[str]:
    """The names in a test module's namespace bound to (something from) a module under ``roots``."""
    found = []
    for attr, value in vars(module).items():
        where = value.__name__ if isinstance(value, type(pytest)) else getattr(value, "__module__", None)
        if isinstance(where, str) and _is_within(where, roots):
            found.append(attr)
    return sorted(found)


def _tier_errors(item) -> list[str]:
    errors = []
    module = getattr(item, "module", None)
    if item.get_closest_marker("servers") is None:
        if fixtures := sorted(SERVER_FIXTURES.intersection(item.fixturenames)):
            errors.append(f"uses {', '.join(fixtures)} without the servers marker")
        if module is not None and (names := _module_uses(module, SERVER_MODULES)):
            errors.append(f"its module imports {', '.join(names)} without the servers marker")
    if item.get_closest_marker("lmcache") is None and module is not None:
        if names := _module_uses(module, LMCACHE_MODULES):
            errors.append(f"its module imports {', '.join(names)} without the lmcache marker")
    return errors


def pytest_collection_modifyitems(config, items):
    for item in items:
        if errors := _tier_errors(item):
            item.stash[_TIER_ERRORS] = errors


TIER_MARKERS = frozenset({"servers", "lmcache", "slow"})


def _module_markers(path) -> set[str]:
    """The markers of a test module's ``pytestmark``, read from its source (nothing is imported)."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return set()
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            for sub in ast.walk(node.value):
                if (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute) and sub.value.attr == "mark"
                        and isinstance(sub.value.value, ast.Name) and sub.value.value.id == "pytest"):
                    found.add(sub.attr)
    return found


def pytest_ignore_collect(collection_path, config):
    """Under ``-m`` over the tier markers only, a module whose ``pytestmark`` already deselects every
    test in it is not imported at all (torch and lmcache cost seconds to import): the fast tier collects
    in a second or two, not half a minute."""
    expr = config.getoption("markexpr", "")
    if not expr or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    names = set(re.findall(r"[A-Za-z_][\w.]*", expr)) - {"and", "or", "not"}
    if not names <= TIER_MARKERS:
        return None
    from _pytest.mark.expression import Expression

    marked = _module_markers(collection_path) & TIER_MARKERS
    rest = sorted(TIER_MARKERS - marked)
    compiled = Expression.compile(expr)
    for extra in itertools.chain.from_iterable(itertools.combinations(rest, n) for n in range(len(rest) + 1)):
        present = marked | set(extra)
        if compiled.evaluate(lambda name, /, present=present, **kwargs: name in present):
            return None  # some test of the module could still be selected
    return True


def _newly_loaded(before: set[str], roots: tuple[str, ...]) -> list[str]:
    return sorted(m for m in set(sys.modules) - before if m in roots)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.remove(item)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if errors := item.stash.get(_TIER_ERRORS, None):
        pytest.fail(f"{item.nodeid}: {'; '.join(errors)} (tests/conftest.py, Test tiers)", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    before = set(sys.modules)
    result = yield
    wrong = []
    if item.get_closest_marker("servers") is None:
        wrong += _newly_loaded(before, SERVER_MODULES)
    if item.get_closest_marker("lmcache") is None:
        wrong += _newly_loaded(before, LMCACHE_MODULES)
    if wrong:
        pytest.fail(f"{item.nodeid} imported {', '.join(wrong)} without the servers/lmcache marker "
                    "(tests/conftest.py, Test tiers)", pytrace=False)
    return result
