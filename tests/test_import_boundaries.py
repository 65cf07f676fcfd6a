"""The layers: workbench and CLI -> services -> db / imaging / model / training / pacs. No import runs back up,
and the shells (CLI, workbench) reach the database only through services. Every import statement counts,
including those inside functions and under TYPE_CHECKING: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELLS = sorted([*ROOT.glob("medvqa/cli*.py"), *ROOT.glob("medvqa/cli/**/*.py"), *ROOT.glob("workbench/**/*.py")])
SERVICES = sorted(ROOT.glob("medvqa/services/**/*.py"))
LOWER = sorted(
    path for layer in ("db", "imaging", "model", "training", "pacs") for path in ROOT.glob(f"medvqa/{layer}/**/*.py")
)
# (files, module prefixes they must not import, why)
RULES = (
    (SHELLS, ("sqlalchemy", "medvqa.db"), "the CLI and the workbench reach the database through medvqa.services"),
    (SERVICES, ("medvqa.cli", "workbench", "streamlit", "click"), "services are called by the shells, never call them"),
    (
        LOWER,
        ("medvqa.services", "medvqa.cli", "workbench", "streamlit", "click"),
        "db, imaging, model, training and pacs sit below the services",
    ),
)


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, relative imports resolved against its package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)  # `from medvqa import db`
    return sorted(found)


def violations(files: list[Path], forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    return [
        f"{path.relative_to(root)}:{line} imports {module}"
        for path in files
        for line, module in imported_modules(path, root)
        if any(module == prefix or module.startswith(prefix + ".") for prefix in forbidden)
    ]


@pytest.mark.parametrize(("files", "forbidden", "why"), RULES, ids=("shells", "services", "lower-layers"))
def test_no_import_crosses_a_layer_boundary(files: list[Path], forbidden: tuple[str, ...], why: str) -> None:
    assert files, "the layer's files were not found"
    assert violations(files, forbidden) == [], why


def test_the_check_sees_lazy_relative_and_type_checking_imports(tmp_path: Path) -> None:
    """The walk is not fooled by an import inside a function, under TYPE_CHECKING, or written relative."""
    probe = tmp_path / "workbench" / "app_pages" / "page.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from medvqa.db.engine import Database\n"
        "def f():\n    import sqlalchemy.exc\n"
        "from .. import resources\n"
        "import sqlalchemyish\n"
        "from medvqa import db, errors\n"
    )
    found = violations([probe], ("sqlalchemy", "medvqa.db", "workbench.resources"), root=tmp_path)
    assert found == [
        "workbench/app_pages/page.py:3 imports medvqa.db.engine.Database",
        "workbench/app_pages/page.py:5 imports sqlalchemy.exc",
        "workbench/app_pages/page.py:6 imports workbench.resources",
        "workbench/app_pages/page.py:8 imports medvqa.db",
    ]
