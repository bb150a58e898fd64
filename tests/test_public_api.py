"""The public surface: a small set of names re-exported lazily from `hf_otfusion`, equal to what type checkers see."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import hf_otfusion

PACKAGE = Path(hf_otfusion.__file__).parent


def _type_checking_imports() -> dict[str, str]:
    """`{name: module}` of the imports under `if TYPE_CHECKING:` in `hf_otfusion/__init__.py`."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING")
    return {alias.name: node.module for node in block.body for alias in node.names}


def test_the_lazy_table_and_the_type_checking_imports_name_the_same_objects():
    assert _type_checking_imports() == hf_otfusion._EXPORTS
    assert hf_otfusion.__all__ == sorted(hf_otfusion._EXPORTS)


def test_every_public_name_resolves_to_the_object_its_module_defines():
    for name, module in hf_otfusion._EXPORTS.items():
        assert getattr(hf_otfusion, name) is getattr(importlib.import_module(f"hf_otfusion.{module}"), name)


def test_internals_are_not_public():
    # the surface is what the README shows; the rest stays importable from its module
    assert len(hf_otfusion._EXPORTS) <= 30
    for internal in ("merge_parameters", "TransportMap", "resolve_plan", "Provenance", "SpecError"):
        assert internal not in hf_otfusion._EXPORTS
    from hf_otfusion.engine.transport import TransportMap  # noqa: F401
    from hf_otfusion.errors import SpecError  # noqa: F401


def test_the_package_is_typed_and_imports_without_torch():
    assert (PACKAGE / "py.typed").is_file()
    check = "import sys, hf_otfusion, hf_otfusion.cli; hf_otfusion.cli.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"  # --help and the local Hub server start without torch
