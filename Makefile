# Two commands on a fresh machine: `make demo` and `make test`. Everything else they need, they install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# The CPU build of torch; an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
# The workspace: the core and every backend distribution in backends/, editable.
BACKENDS := $(sort $(dir $(wildcard backends/*/pyproject.toml)))
WORKSPACE := $(foreach b,$(BACKENDS),-e $(b))
URL ?=
RUFF := $(PY) -m ruff check kvstore tests scripts backends
# Type checks: the files and flags are [tool.mypy] in pyproject.toml (strict on the core).
MYPY := $(PY) -m mypy
# The fast tier: tests that need no S3 server, no lmcache or torch, and are not slow (tests/conftest.py).
FAST := -m "not servers and not lmcache and not slow"

.PHONY: demo test test-fast docs docs-gen conformance-doc bench clean

$(VENV)/.installed: pyproject.toml $(wildcard backends/*/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e '.[all]' $(WORKSPACE) $(TORCH)
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(PIP) -e '.[all,test,docs,bench]' $(WORKSPACE) $(TORCH)
	touch $@

demo: $(VENV)/.installed
	PYTHONHASHSEED=0 $(PY) -m kvstore.demo $(URL)

test: $(VENV)/.test-installed
	$(RUFF)
	$(MYPY)
	bash scripts/install-test-servers.sh
	$(PY) scripts/gen_config_doc.py --check
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir .site
	PYTHONHASHSEED=0 $(PY) -m pytest

test-fast: $(VENV)/.test-installed
	$(RUFF)
	$(MYPY)
	PYTHONHASHSEED=0 $(PY) -m pytest -q $(FAST)

docs-gen: $(VENV)/.test-installed
	$(PY) scripts/gen_config_doc.py

docs: docs-gen
	$(VENV)/bin/mkdocs build --strict --site-dir .site

conformance-doc: $(VENV)/.test-installed
	$(PY) scripts/gen_conformance_doc.py

bench: $(VENV)/.test-installed
	$(PY) scripts/gen_bench.py

clean:
	rm -rf $(VENV) .site .kvstore-demo .pytest_cache .hypothesis .mypy_cache
