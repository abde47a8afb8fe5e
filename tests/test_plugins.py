"""Backends as plugins: discovery through entry points, an out-of-tree backend, the workspace's distributions."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import kvstore
from kvstore import plugins
from kvstore.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CLI = "import sys; from kvstore.cli.main import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture
def fresh_registry():
    plugins.refresh()
    yield
    plugins.refresh()


def _dist_info(site: Path, name: str, entry_points: str) -> None:
    """A minimal installed distribution: what importlib.metadata reads entry points from."""
    info = site / f"{name.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


def test_the_workspace_backends_are_found_through_their_distributions():
    found = plugins.installed()
    for name in ("memory", "file"):
        assert found[name].origin == "kvcache-store"
    for name in ("crt", "obstore", "fsspec"):
        assert found[name].origin.startswith(f"kvcache-store-{name} "), found[name].origin
    assert plugins.broken() == ()


def test_each_profile_defaults_to_its_highest_priority_backend():
    assert kvstore.resolve("s3://bucket-a/p", {"s3_region": "us-east-1"}).backend == "crt"
    assert kvstore.resolve("/tmp/some-store").backend == "file"
    assert kvstore.resolve("gs://bucket-a/p").backend == "fsspec"  # a profile the fsspec backend adds
    config = kvstore.resolve("s3://bucket-a/p", {"s3_region": "us-east-1"})
    assert "highest-priority installed backend" in config.sources["backend"]
    assert [p.name for p in plugins.serving("aws")] == ["crt", "obstore", "fsspec"]


def test_a_backend_that_is_not_installed_is_a_config_error_listing_what_is():
    with pytest.raises(ConfigError, match=r"no backend 'toy' is installed \(installed: crt, file, fsspec, memory"):
        kvstore.resolve("memory://x", {"kvstore_backend": "toy"})
    with pytest.raises(ConfigError, match="cannot serve the memory profile"):
        kvstore.resolve("memory://x", {"kvstore_backend": "crt"})
    with pytest.raises(ConfigError, match="no profile 'toy'"):
        kvstore.resolve("memory://x", {"kvstore_profile": "toy"})


def test_a_broken_or_foreign_entry_point_is_reported_and_leaves_the_others(tmp_path, monkeypatch, fresh_registry):
    _dist_info(tmp_path, "kvstore-broken", "[kvstore.backends]\nbroken = no_such_module_here:PLUGIN\n"
                                           "notaplugin = os:sep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.refresh()
    assert dict(plugins.broken())["broken"].startswith("ModuleNotFoundError")
    assert "notaplugin" not in plugins.installed() and "crt" in plugins.installed()
    with pytest.raises(ConfigError, match="'broken' is installed but cannot be loaded"):
        kvstore.resolve("memory://x", {"kvstore_backend": "broken"})


def test_proxy_support_comes_from_the_backend_description():
    extra = {"s3_region": "us-east-1", "s3_proxy_url": "http://127.0.0.1:3128"}
    with pytest.raises(ConfigError, match=r"the crt backend cannot go through a proxy.*\(obstore, fsspec\)"):
        kvstore.resolve("s3://bucket-a", extra)
    assert kvstore.resolve("s3://bucket-a", extra | {"kvstore_backend": "obstore"}).proxy_url


def test_every_backend_distribution_is_released_with_the_core():
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    version = core["version"]
    assert kvstore.__version__ == version
    names = []
    for path in sorted((ROOT / "backends").glob("*/pyproject.toml")):
        project = tomllib.loads(path.read_text())["project"]
        names.append(project["name"])
        assert project["version"] == version, path
        assert f"kvcache-store=={version}" in project["dependencies"], path
        assert project["entry-points"]["kvstore.backends"], path
        package = path.parent / project["name"].replace("kvcache-store-", "kvstore_")
        assert (package / "py.typed").exists(), package
    assert names == ["kvcache-store-crt", "kvcache-store-fsspec", "kvcache-store-obstore"]
    extras = core["optional-dependencies"]
    for name in names:
        assert [f"{name}=={version}"] == extras[name.removeprefix("kvcache-store-")]
    assert f"kvcache-store-crt=={version}" in core["dependencies"]  # pip install kvcache-store: S3 works


def test_the_core_names_no_network_backend():
    """Profiles, config and the store know backends only through the registry."""
    pattern = re.compile(r"\b(crt|obstore|fsspec|s3fs|kvstore_crt|kvstore_obstore|kvstore_fsspec)\b")
    offenders = []
    for path in sorted((ROOT / "kvstore").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        # The bench (and its command) compares raw clients by name, the test servers say which clients they suit,
        # and keys.py names other tools' spellings of settings to refuse them.
        if relative.startswith(("kvstore/bench/", "kvstore/testing/")) or relative in (
                "kvstore/config/keys.py", "kvstore/cli/bench_cmd.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert offenders == []


# -- a backend from outside the repository ---------------------------------------------------------
def _example_sources() -> dict[str, str]:
    """The example package of docs/backends.md, file by file, as the page shows it."""
    text = (ROOT / "docs" / "backends.md").read_text()
    blocks = re.findall(r"```(toml|python)\n(.*?)```", text, re.S)
    toml = [body for kind, body in blocks if kind == "toml"]
    python = [body for kind, body in blocks if kind == "python"]
    assert len(toml) == 1 and len(python) == 2, "docs/backends.md shows pyproject.toml, __init__.py, backend.py"
    return {"pyproject.toml": toml[0], "kvstore_sqlite/__init__.py": python[0], "kvstore_sqlite/backend.py": python[1]}


@pytest.fixture(scope="module")
def sqlite_backend(tmp_path_factory):
    """The docs' example built and installed with pip into a directory of its own; (env for subprocesses)."""
    source = tmp_path_factory.mktemp("kvstore-sqlite")
    for name, body in _example_sources().items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(body)
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
                   check=True, capture_output=True, text=True, timeout=300)
    assert (target / "kvstore_sqlite" / "backend.py").exists()
    path = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONHASHSEED": "0"}


def _cli(env, *argv: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *argv], capture_output=True, text=True, env=env, timeout=300,
                          input=stdin)


@pytest.mark.slow  # builds and pip-installs a backend distribution
def test_an_out_of_tree_backend_is_listed_with_its_profile_and_key(sqlite_backend):
    listed = json.loads(_cli(sqlite_backend, "resolve", "--backends", "--json").stdout)
    row = next(r for r in listed if r["backend"] == "sqlite")
    assert row["distribution"] == "kvstore-sqlite 0.1.0" and row["serves"] == ["sqlite"]
    assert row["keys"] == ["kvstore_sqlite_journal_mode"]


@pytest.mark.slow  # builds and pip-installs a backend distribution
def test_an_out_of_tree_backends_keys_are_validated_and_shown(sqlite_backend, tmp_path):
    url = f"sqlite://{tmp_path / 'cache.db'}"
    shown = _cli(sqlite_backend, "resolve", url, "--set", "kvstore_sqlite_journal_mode=delete", "--json")
    assert shown.returncode == 0, shown.stderr
    config = json.loads(shown.stdout)
    assert config["backend"]["value"] == "sqlite" and config["profile"]["value"] == "sqlite"
    assert config["options.kvstore_sqlite_journal_mode"] == {"value": "delete",
                                                             "source": "extra_config:kvstore_sqlite_journal_mode"}
    typo = _cli(sqlite_backend, "resolve", url, "--set", "kvstore_sqlite_journal_mod=wal")
    assert typo.returncode == 2 and "did you mean 'kvstore_sqlite_journal_mode'" in typo.stderr
    wrong = _cli(sqlite_backend, "resolve", url, "--set", "kvstore_sqlite_journal_mode=fast")
    assert wrong.returncode == 2 and "expected one of wal, delete" in wrong.stderr
    elsewhere = _cli(sqlite_backend, "resolve", "memory://x", "--set", "kvstore_sqlite_journal_mode=wal")
    assert elsewhere.returncode == 2 and "is a setting of the sqlite backend" in elsewhere.stderr


@pytest.mark.slow  # builds and pip-installs a backend distribution
def test_an_out_of_tree_backend_passes_the_conformance_suite(sqlite_backend, tmp_path):
    url = f"sqlite://{tmp_path / 'cache.db'}"
    run = _cli(sqlite_backend, "conformance", url, "--set", "kvstore_sqlite_journal_mode=wal", "--json", "-")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(run.stdout)["results"]
    outcomes = {r["case"]: r["outcome"] for r in results}
    assert len(outcomes) > 20 and "fail" not in outcomes.values()
    skipped = {r["case"]: r["detail"] for r in results if r["outcome"] == "skip"}
    # Only what cannot apply to a local file: credentials, buckets, endpoints.
    assert all("applies to S3 stores only" in why for why in skipped.values()), skipped
    assert _cli(sqlite_backend, "put", url, "k", "-", stdin="kv bytes").returncode == 0
    got = _cli(sqlite_backend, "get", url, "k")
    assert got.returncode == 0 and got.stdout == "kv bytes", got.stderr
