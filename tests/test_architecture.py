"""The import graph of ditkit keeps its floors.

Each package of src/ditkit stands on a floor (FLOORS). A module may import from its own package and
from packages on lower floors only: never the same floor, never up; so the packages form no circle.
Imports of ditkit modules stand at the top of a file: a function-local import hides a dependency from
the reader and from this test (function-local imports are kept for optional third-party packages).

ALLOWED lists the (file, imported module) pairs that break these rules and are being fixed elsewhere;
an entry that no longer occurs fails the test, so the list only ever shrinks.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "ditkit"

FLOORS = {"errors": 0, "files": 1, "config": 2, "mixers": 3, "data": 3, "models": 4, "record": 5,
          "checkpoint": 6, "diffusion": 6, "distributed": 7, "diffusers": 8, "convert": 9, "metrics": 9,
          "train": 10, "distill": 11, "study": 12, "cli": 13}

# (file under src/ditkit, imported module): exceptions to the rules; none today. An entry must say why.
ALLOWED: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    file: str  # under src/ditkit, e.g. "cli/train.py"
    line: int
    module: str  # the ditkit module imported, e.g. "ditkit.train.config"
    local: bool  # inside a function

    @property
    def importer(self) -> str:
        """The importing file's package: its first part ("cli", "record" for record.py)."""
        return self.file.split("/")[0].removesuffix(".py")

    @property
    def imported(self) -> str:
        """The imported package; a name of the root package (`from .. import __version__`) is "ditkit"."""
        name = self.module.split(".")[1]
        return name if name in PACKAGES else "ditkit"

    def __str__(self) -> str:
        return f"src/ditkit/{self.file}:{self.line} imports {self.module}"


def modules() -> list[Path]:
    return sorted(path for path in SOURCE.rglob("*.py") if path != SOURCE / "__init__.py")  # the root: exempt


PACKAGES = {path.relative_to(SOURCE).parts[0].removesuffix(".py") for path in modules()}


def imported_modules(node: ast.Import | ast.ImportFrom, package: list[str]) -> list[str]:
    """The absolute names a statement imports; `package` is the importing module's package, as parts."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not node.level:
        return [node.module or ""]
    base = package[: len(package) - node.level + 1]
    if node.module:
        return [".".join([*base, node.module])]
    return [".".join([*base, alias.name]) for alias in node.names]  # from . import x: the module x


def ditkit_imports(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    local = {id(node) for function in ast.walk(tree) if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
             for node in ast.walk(function)}
    parts = ["ditkit", *path.relative_to(SOURCE).with_suffix("").parts]
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = [p for p in package if p != "__init__"]
    file = path.relative_to(SOURCE).as_posix()
    return [Import(file, node.lineno, module, id(node) in local)
            for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
            for module in imported_modules(node, package) if module.startswith("ditkit.")]


IMPORTS = [found for path in modules() for found in ditkit_imports(path)]
# The root package re-exports a few names; importing from it imports what it imports.
ROOT_FLOOR = max(FLOORS[found.imported] for found in ditkit_imports(SOURCE / "__init__.py"))


def floor(package: str) -> int:
    return ROOT_FLOOR if package == "ditkit" else FLOORS[package]


def upward(found: Import) -> bool:
    return found.imported != found.importer and floor(found.imported) >= floor(found.importer)


def breaks_a_rule(found: Import) -> bool:
    return found.local or upward(found)


def test_every_package_stands_on_a_floor():
    unplaced = sorted(PACKAGES - set(FLOORS))
    assert not unplaced, f"place these packages on a floor in FLOORS (tests/test_architecture.py): {unplaced}"


def test_no_package_imports_its_own_floor_or_above():
    bad = [f"{found} (floor {floor(found.importer)} -> floor {floor(found.imported)})" for found in IMPORTS
           if upward(found) and (found.file, found.module) not in ALLOWED]
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_ditkit_modules_are_imported_at_the_top_of_a_file():
    bad = [str(found) for found in IMPORTS if found.local and (found.file, found.module) not in ALLOWED]
    assert not bad, "function-local imports of ditkit modules (move them to the top):\n" + "\n".join(bad)


def test_every_allowed_exception_still_occurs():
    """An entry of ALLOWED whose import was fixed (or moved) must leave the list."""
    occurring = {(found.file, found.module) for found in IMPORTS if breaks_a_rule(found)}
    stale = sorted(ALLOWED - occurring)
    assert not stale, f"remove these entries from ALLOWED, their imports are fixed: {stale}"


def package_graph(imports: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for found in imports:
        if found.imported != found.importer:
            graph[found.importer].add(found.imported)
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of packages in `graph`, or None (depth-first search, packages in sorted order)."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(package: str, path: list[str]) -> list[str] | None:
        state[package] = "open"
        for other in sorted(graph.get(package, ())):
            if state.get(other) == "open":
                return [*path[path.index(other):], other]
            if other not in state and (found := visit(other, [*path, other])):
                return found
        state[package] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_packages_form_no_circle():
    """Over every import but the ALLOWED ones (pending fixes), at the top of a file or not."""
    checked = [found for found in IMPORTS if (found.file, found.module) not in ALLOWED]
    circle = cycle(package_graph(checked))
    assert circle is None, f"packages import each other: {' -> '.join(circle)}"


def test_the_circle_finder_finds_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_relative_imports_resolve_to_the_modules_they_name():
    package = ["ditkit", "train"]
    parse = lambda text: ast.parse(text).body[0]  # noqa: E731
    assert imported_modules(parse("from ..record import RunRecord"), package) == ["ditkit.record"]
    assert imported_modules(parse("from . import loop, trainer"), package) == ["ditkit.train.loop",
                                                                              "ditkit.train.trainer"]
    assert imported_modules(parse("from .. import config as loader"), package) == ["ditkit.config"]
    assert imported_modules(parse("import ditkit.models.dit"), package) == ["ditkit.models.dit"]
