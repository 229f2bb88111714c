"""Tier 1: the house's rules, read from the code's AST. The library owns the logic and never imports dagster;
assets are short shells; layers point one way; tracking is a leaf."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "finetune_pipeline"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _files(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py")) if (PKG / sub).is_dir() else [PKG / sub]


ENTRY_POINTS = ("definitions.py", "cli.py")  # they drive Dagster: the Dagster-facing side, like defs/
LIBRARY = [p for p in PKG.rglob("*.py") if "defs" not in p.parts and p.name not in ENTRY_POINTS]


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PKG)))
def test_the_library_never_imports_dagster_or_the_shells(path: Path) -> None:
    bad = {m for m in _imports(path) if m == "dagster" or m.startswith(("dagster.", "finetune_pipeline.defs"))}
    bad |= {m for m in _imports(path) if m == "finetune_pipeline.definitions"}
    assert not bad, f"{path.name} imports {sorted(bad)}"


RULES = [
    (
        "models",
        (
            "finetune_pipeline.evaluation",
            "finetune_pipeline.training",
            "finetune_pipeline.tuning",
            "finetune_pipeline.stages",
        ),
    ),
    (
        "data",
        (
            "finetune_pipeline.models",
            "finetune_pipeline.training",
            "finetune_pipeline.evaluation",
            "finetune_pipeline.tracking",
        ),
    ),
    ("tracking", ("finetune_pipeline",)),
    ("tuning", ("mlflow", "finetune_pipeline.tracking")),
    ("training", ("finetune_pipeline.evaluation", "finetune_pipeline.tuning", "finetune_pipeline.stages", "mlflow")),
    ("evaluation", ("finetune_pipeline.training", "finetune_pipeline.tuning", "finetune_pipeline.stages")),
    (
        "spec.py",
        (
            "finetune_pipeline.data",
            "finetune_pipeline.models",
            "finetune_pipeline.evaluation",
            "finetune_pipeline.layout",
        ),
    ),
    (
        "layout.py",
        (
            "finetune_pipeline.data",
            "finetune_pipeline.models",
            "finetune_pipeline.evaluation",
            "finetune_pipeline.spec",
        ),
    ),
    (
        "release",
        (
            "finetune_pipeline.training",
            "finetune_pipeline.tuning",
            "finetune_pipeline.stages",
            "finetune_pipeline.tracking",
            "mlflow",
        ),
    ),
    ("cli.py", ("finetune_pipeline.definitions",)),
    ("defs", ("mlflow",)),
]


@pytest.mark.parametrize(("layer", "forbidden"), RULES, ids=[r[0] for r in RULES])
def test_layers_point_one_way(layer: str, forbidden: tuple[str, ...]) -> None:
    own = f"finetune_pipeline.{layer}"  # a layer may always use itself (tracking: nothing else)
    found = {
        f"{p.relative_to(PKG)} -> {m}"
        for p in _files(layer)
        for m in _imports(p)
        if any(m == f or m.startswith(f + ".") for f in forbidden) and not (m == own or m.startswith(own + "."))
    }
    assert not found, sorted(found)


def _decorated(node: ast.FunctionDef) -> bool:
    names = {ast.unparse(d) for d in node.decorator_list}
    return any(k in n for n in names for k in ("asset", "check", "sensor", "schedule"))


DEFS = sorted((PKG / "defs").rglob("*.py"))


@pytest.mark.parametrize("path", DEFS, ids=lambda p: p.name)
def test_asset_bodies_are_short_shells(path: Path) -> None:
    """No asset, check, sensor or schedule body over 60 lines; no builder (a function that defines one) over 80."""
    long = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef):
            continue
        lines = node.end_lineno - node.body[0].lineno + 1  # type: ignore[operator]
        inner = any(isinstance(n, ast.FunctionDef) and _decorated(n) for n in ast.walk(node) if n is not node)
        if (_decorated(node) and lines > 60) or (inner and lines > 80):
            long.append(f"{node.name}: {lines} lines")
    assert not long, long
