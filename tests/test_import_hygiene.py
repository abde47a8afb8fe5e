"""Test-only machinery (kvstore.testing: loopback servers, fault proxy, S3 Express gateway, throwaway
CA) is loaded by nothing a user runs unless the user asks for it (``kvstore conformance``, ``kvstore
bench --server``)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

KVSTORE = Path(__file__).resolve().parents[1] / "kvstore"

_LOADED = (
    "import json, sys\n"
    "print(json.dumps(sorted(m for m in sys.modules if m == 'kvstore.testing' or m.startswith('kvstore.testing.'))))\n"
)


def _testing_modules_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + _LOADED], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_importing_kvstore_and_its_cli_and_using_a_memory_store_loads_no_test_machinery():
    code = (
        "import kvstore, kvstore.cli.main\n"
        "with kvstore.open('memory://hygiene') as s:\n"
        "    s.put('k', b'v')\n"
        "    assert s.get('k') == b'v' and list(s.list()) == ['k']\n"
        "assert kvstore.cli.main.main(['resolve', 'memory://hygiene']) == 0\n"
    )
    assert _testing_modules_after(code) == []


def test_kvstore_conformance_loads_the_suite_and_no_server_proxy_or_ca():
    code = (
        "import contextlib, io, kvstore.cli.main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert kvstore.cli.main.main(['conformance', '--list', 'memory://hygiene']) == 0\n"
    )
    loaded = _testing_modules_after(code)
    assert "kvstore.testing.conformance" in loaded
    assert [m for m in loaded if not m.startswith("kvstore.testing.conformance")] == ["kvstore.testing"]


def test_the_package_imports_kvstore_testing_only_inside_functions():
    """Outside kvstore/testing, an import of kvstore.testing sits inside the function (the command)
    that needs it, never at module level."""
    at_module_level = []

    def visit(node: ast.AST, path: Path) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue  # imports in here run when the command that needs them runs
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module] + [f"{child.module}.{alias.name}" for alias in child.names]
            if any(n == "kvstore.testing" or n.startswith("kvstore.testing.") for n in names):
                at_module_level.append(f"{path.relative_to(KVSTORE.parent)}:{child.lineno}")
            visit(child, path)

    for path in sorted(KVSTORE.rglob("*.py")):
        if path.relative_to(KVSTORE).parts[0] != "testing":
            visit(ast.parse(path.read_text(), filename=str(path)), path)
    assert at_module_level == []
