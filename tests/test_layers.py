"""The package's layers: every module imports only from its own layer or a lower one (../shared/layout.md).

    _checks, ops  <  reference  <  api, kvcache  <  nn, data, parallel  <  models
                  <  training, evaluation, snr, bench, integrations  <  cli  <  __main__

Nothing but ``__main__`` imports ``cli``. Imports under ``if __name__ == "__main__":`` are a program's
entry and are exempt. The old top-level modules kept for one release (``flashmoba.model`` and the others
in ``COMPATIBILITY_SHIMS``) only re-export: they may import from any layer, and define nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "flashmoba"

LAYERS = [
    {"_checks", "ops"},
    {"reference"},
    {"api", "kvcache", ""},  # "": the package itself (flashmoba/__init__.py re-exports api)
    {"nn", "data", "parallel"},
    {"models"},
    {"training", "evaluation", "snr", "bench", "integrations"},
    {"cli"},
    {"__main__"},
]
LAYER_OF = {room: level for level, rooms in enumerate(LAYERS) for room in rooms}

# Old import paths, re-exporting their new homes for one release.
COMPATIBILITY_SHIMS = {"model", "train", "evaluate", "snr_cli", "demo"}


def module_name(path: Path, root: Path = PACKAGE_ROOT) -> str:
    """``flashmoba.ops.router`` for ``src/flashmoba/ops/router.py``; packages by their ``__init__``."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room_of(module: str) -> str:
    """The top-level room of a ``flashmoba`` module: ``ops`` for ``flashmoba.ops.router``; "" for the
    package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_main_guard(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators)
    )


def _walk_outside_main_guard(tree: ast.Module):
    stack = [node for node in tree.body if not _is_main_guard(node)]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imported_modules(source: str, module: str, is_package: bool, root: Path = PACKAGE_ROOT) -> set[str]:
    """The ``flashmoba`` modules a module's source imports (relative imports resolved), outside a
    ``__main__`` guard. ``from flashmoba.x import name`` counts as ``flashmoba.x.name`` when ``name`` is a
    submodule on disk, as ``flashmoba.x`` otherwise."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in _walk_outside_main_guard(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = root.parent.joinpath(*f"{target}.{alias.name}".split("."))
                is_submodule = candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file()
                found.add(f"{target}.{alias.name}" if is_submodule else target)
    return {name for name in found if name == "flashmoba" or name.startswith("flashmoba.")}


def violations(module: str, imports: set[str]) -> list[str]:
    """Imports of ``module`` that go up a layer, or into ``cli`` from anywhere but ``__main__``."""
    room = room_of(module)
    if room in COMPATIBILITY_SHIMS:
        return []
    if room not in LAYER_OF:
        return [f"{module}: its room {room!r} has no layer (add it to LAYERS in tests/test_layers.py)"]
    found = []
    for imported in sorted(imports):
        target = room_of(imported)
        if target in COMPATIBILITY_SHIMS:
            found.append(f"{module} imports the compatibility shim {imported} (import its new home)")
        elif target == "cli" and room not in ("cli", "__main__"):
            found.append(f"{module} imports {imported}: only flashmoba.__main__ may import cli")
        elif target not in LAYER_OF:
            found.append(f"{module} imports {imported}, which has no layer")
        elif LAYER_OF[target] > LAYER_OF[room]:
            found.append(f"{module} (layer {LAYER_OF[room]}) imports {imported} (layer {LAYER_OF[target]})")
    return found


def package_modules() -> list[Path]:
    return sorted(PACKAGE_ROOT.rglob("*.py"))


def test_no_module_imports_a_higher_layer():
    found = []
    for path in package_modules():
        module = module_name(path)
        imports = imported_modules(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
        found += violations(module, imports)
    assert not found, "imports against the layers:\n" + "\n".join(found)


def test_compatibility_shims_only_re_export():
    for room in sorted(COMPATIBILITY_SHIMS):
        path = PACKAGE_ROOT / f"{room}.py"
        if not path.exists():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = [
            node.name
            for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        ]
        assert not defined, f"{path.name} is a compatibility shim but defines {defined}"


@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("flashmoba.ops.router", "from flashmoba.models import HybridLM", "imports flashmoba.models"),
        ("flashmoba.api", "from .nn import attention", "imports flashmoba.nn.attention"),
        ("flashmoba.models.hybrid", "def f():\n    import flashmoba.training", "imports flashmoba.training"),
        ("flashmoba.snr.theory", "from flashmoba.cli import snr", "only flashmoba.__main__ may import cli"),
        ("flashmoba.training.loop", "from flashmoba.train import train", "compatibility shim"),
        ("flashmoba.unplaced", "import torch", "has no layer"),
    ],
)
def test_the_checker_finds_upward_imports(module, source, expected):
    is_package = False
    found = violations(module, imported_modules(source, module, is_package))
    assert any(expected in message for message in found), found


def test_the_checker_allows_downward_and_guarded_imports():
    source = (
        "from flashmoba import reference\nfrom flashmoba._checks import check_int\n"
        "import flashmoba.nn\n"
        'if __name__ == "__main__":\n    from flashmoba.cli import main\n'
    )
    module = "flashmoba.models.hybrid"
    assert violations(module, imported_modules(source, module, is_package=False)) == []
