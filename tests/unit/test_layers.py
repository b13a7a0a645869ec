"""The layers point down: read every module's imports (at the top, in functions, under
TYPE_CHECKING, and ``importlib.import_module`` of a constant name) statically and fail on one
that reaches a layer above the importer."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import gateway

ROOT = Path(gateway.__file__).parent
ENTRY = ("gateway.app", "gateway.admin", "gateway.cli")
RULES: tuple[tuple[tuple[str, ...], tuple[str, ...], str], ...] = (
    # (importers, what they must not import, except), by package prefix
    (("gateway.core",), ("gateway",), "gateway.core"),
    (
        ("gateway.policy", "gateway.store", "gateway.backends", "gateway.state", "gateway.sim"),
        ("gateway.proxy",),
        "",
    ),
    (
        ("gateway.core", "gateway.policy", "gateway.store", "gateway.backends", "gateway.proxy"),
        ENTRY,
        "",
    ),
)


@dataclass(frozen=True)
class Import:
    where: str  # the file, from the folder that holds the package
    line: int
    source: str  # the statement as written
    importer: str
    target: str  # the module it loads, resolved against the tree

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: `{self.source}` ({self.importer} -> {self.target})"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imports_of(path: Path, root: Path, modules: frozenset[str]) -> list[Import]:
    """Every import in ``path``, wherever it is written, each resolved to the module it loads:
    ``from a import b`` loads ``a.b`` when that is a module of the tree, else ``a``."""
    importer = _module_name(path, root)
    where = path.relative_to(root.parent).as_posix()
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    text = path.read_text()
    found: list[Import] = []

    def add(node: ast.stmt | ast.expr, target: str) -> None:
        source = ast.get_source_segment(text, node) or ast.dump(node)
        found.append(Import(where, node.lineno, " ".join(source.split()), importer, target))

    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(node, full if full in modules else base)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            add(node, node.args[0].value)
    return found


def upward(imports: list[Import]) -> list[str]:
    """The imports that break a rule, each with the rule it breaks."""
    broken = []
    for item in imports:
        for importers, banned, allowed in RULES:
            if not any(_within(item.importer, p) for p in importers):
                continue
            if allowed and _within(item.target, allowed):
                continue
            if any(_within(item.target, b) for b in banned):
                broken.append(f"{item}: {item.importer} must not import {item.target}")
    return broken


def _tree(root: Path) -> tuple[list[Path], frozenset[str]]:
    files = sorted(root.rglob("*.py"))
    return files, frozenset(_module_name(path, root) for path in files)


def test_no_module_imports_a_layer_above_it() -> None:
    files, modules = _tree(ROOT)
    imports = [item for path in files for item in imports_of(path, ROOT, modules)]
    assert len(files) >= 50
    # the scan sees the edges the layers are built of, inside functions too
    edges = {(item.importer, item.target) for item in imports}
    assert ("gateway.app", "gateway.proxy.exchange") in edges
    assert ("gateway.proxy.limits", "gateway.core.bucket") in edges
    broken = upward(imports)
    assert not broken, "imports pointing up a layer:\n" + "\n".join(broken)


def test_an_upward_import_anywhere_in_a_module_is_named_with_its_file_and_line(
    tmp_path: Path,
) -> None:
    root = tmp_path / "gateway"
    for package in ("core", "store", "proxy", "sim"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "errors.py").write_text("")
    (root / "cli.py").write_text("")
    (root / "proxy" / "forward.py").write_text("")
    (root / "core" / "bucket.py").write_text(
        "from __future__ import annotations\n"
        "from gateway.core import clock\n"
        "from . import types\n"
        "\n"
        "def f() -> None:\n"
        "    from gateway import errors\n"
        "\n"
        "def g() -> None:\n"
        "    from ..proxy.forward import Timeouts\n"
    )
    (root / "store" / "redis.py").write_text(
        "import typing\n"
        "if typing.TYPE_CHECKING:\n"
        "    import gateway.proxy.forward\n"
        "import importlib\n"
        "cli = importlib.import_module('gateway.cli')\n"
    )
    (root / "sim" / "engine.py").write_text("from gateway.store import redis\n")
    files, modules = _tree(root)
    broken = upward([item for path in files for item in imports_of(path, root, modules)])
    assert broken == [
        "gateway/core/bucket.py:6: `from gateway import errors` (gateway.core.bucket -> "
        "gateway.errors): gateway.core.bucket must not import gateway.errors",
        "gateway/core/bucket.py:9: `from ..proxy.forward import Timeouts` (gateway.core.bucket "
        "-> gateway.proxy.forward): gateway.core.bucket must not import gateway.proxy.forward",
        "gateway/store/redis.py:3: `import gateway.proxy.forward` (gateway.store.redis -> "
        "gateway.proxy.forward): gateway.store.redis must not import gateway.proxy.forward",
        "gateway/store/redis.py:5: `importlib.import_module('gateway.cli')` (gateway.store.redis "
        "-> gateway.cli): gateway.store.redis must not import gateway.cli",
    ]
