"""The layering rule of ARCHITECTURE.md: PURE packages import no adapter, orchestrator or CLI."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from hvtools import bits

HVTOOLS = Path(bits.__file__).parent
PURE_FILES = [*sorted((HVTOOLS / "mmu").glob("*.py")), *sorted((HVTOOLS / "iommu").glob("*.py")),
              *sorted((HVTOOLS / "tracking").glob("*.py")),
              HVTOOLS / "bits.py", HVTOOLS / "addr.py", HVTOOLS / "translation.py",
              HVTOOLS / "memory" / "protocol.py", HVTOOLS / "memory" / "buffer.py"]
#: What a PURE module may import from hvtools (ARCHITECTURE.md "Layers").
PURE_OK = ("hvtools.mmu", "hvtools.iommu", "hvtools.caches", "hvtools.tracking",
           "hvtools.memory.protocol", "hvtools.memory.buffer", "hvtools.addr", "hvtools.bits",
           "hvtools.errors", "hvtools.translation")
THIRD_PARTY_OK = ("numpy",)


def _imports(path: Path, package: str | None = None) -> list[str]:
    """Every module ``path`` imports (anywhere in it), relative imports made absolute."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if package is None:
        package = ".".join(path.relative_to(HVTOOLS.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found += [mod] if node.module or not node.level else \
                [f"{mod}.{a.name}" for a in node.names]
    return found


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: str(p.relative_to(HVTOOLS)))
def test_pure_layers_import_no_adapter(path: Path) -> None:
    for mod in _imports(path):
        top = mod.split(".")[0]
        if top == "hvtools":
            assert mod.startswith(PURE_OK), f"{path.name} imports {mod}: not a PURE layer"
        else:
            assert top in sys.stdlib_module_names or top in THIRD_PARTY_OK or top == "__future__", \
                f"{path.name} imports {mod}: only the standard library (and numpy) are allowed"


def test_layer_check_sees_relative_and_nested_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from ..control import driver\nfrom . import ept\n"
                     "def f():\n    import click\n")
    assert _imports(probe, "hvtools.mmu") == ["hvtools.control", "hvtools.mmu.ept", "click"]


