"""Imports in comet_ray/ flow one way: no module imports from a module that imports it.

A static walk of every module's source (function-level imports included: they are imports a reader
follows too). ``from package import name`` counts as an import of ``package.name`` when that is a module,
else of ``package``; importing ``a.b.c`` does not count as importing the packages ``a`` and ``a.b``
(their ``__init__`` runs first, but a reader does not follow it).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "comet_ray"


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under the package."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source."""
    modules = module_files(package_dir)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(module, is_package, node)
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.add(submodule if submodule in modules else source)
        graph[module] = {t for t in targets if t in modules and t != module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_through(graph, set(component)) for component in components]


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest closed path inside ``component`` from its first module back to it."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"not a cycle: {sorted(component)}")


def test_no_import_cycle_in_comet_ray():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in comet_ray/:\n" + "\n".join(" -> ".join(c) for c in cycles)


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between folders: every module of a subpackage (``comet_ray.comet.trainer``)
    becomes its subpackage (``comet_ray.comet``); the top-level modules stay themselves, as they are
    rooms of their own (``comet_ray.evaluate``). An edge is any import from one to another."""
    subpackages = {".".join(m.split(".")[:2]) for m in graph if m.count(".") >= 2}

    def room(module: str) -> str:
        top = ".".join(module.split(".")[:2])
        return top if top in subpackages else module

    rooms: dict[str, set[str]] = {}
    for module, targets in graph.items():
        rooms.setdefault(room(module), set()).update(room(t) for t in targets)
    return {r: targets - {r} for r, targets in rooms.items()}


def test_no_import_loop_between_folders():
    """comet/ -> evaluate -> comet/ is a loop a file-level walk misses (each file imports another file)."""
    cycles = find_cycles(package_graph(import_graph()))
    assert not cycles, "import loops between folders of comet_ray/:\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )


def test_the_folder_walk_finds_a_loop_the_file_walk_misses(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "a.py").write_text("from pkg.top import f\n")
    (package / "sub" / "b.py").write_text("")
    (package / "top.py").write_text("from pkg.sub.b import g\n")
    graph = import_graph(package)
    assert find_cycles(graph) == []
    rooms = package_graph(graph)
    assert rooms["pkg.sub"] == {"pkg.top"} and rooms["pkg.top"] == {"pkg.sub"}
    assert find_cycles(rooms) == [["pkg.sub", "pkg.top", "pkg.sub"]]


def test_the_walk_finds_a_cycle_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import b\n")
    (package / "a.py").write_text("def f():\n    from pkg.sub.b import g\n")
    (package / "sub" / "b.py").write_text("from ..c import h\n")
    (package / "c.py").write_text("import pkg.a\n")
    graph = import_graph(package)
    assert graph["pkg.sub"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]


def test_readme_layout_lists_every_module_where_it_lives():
    """The README's layout block names each module of comet_ray/ under its folder, and nothing else."""
    import re

    readme = (PACKAGE_DIR.parent / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    entries: dict[str, str] = {}  # "" for top-level files, else the folder, -> its description text
    current = None
    for line in block.splitlines()[2:]:  # after "comet_ray/"
        if re.match(r"^  \S", line):
            name, _, text = line.strip().partition(" ")
            current = name.rstrip("/") if name.endswith("/") else ""
            entries[current] = entries.get(current, "") + (text if current else " " + name)
        elif re.match(r"^\S", line):
            break  # bench/, tests/: outside the package
        elif current is not None:
            entries[current] += " " + line.strip()
    for folder, text in entries.items():
        where = PACKAGE_DIR / folder
        named = set(re.findall(r"\b([a-z_0-9]+\.(?:py|yaml))\b", text))
        present = {p.name for p in where.iterdir() if p.suffix in (".py", ".yaml")}
        missing = present - named - {"__init__.py", "__main__.py"}
        assert not missing, f"README layout does not list {sorted(missing)} under comet_ray/{folder}"
        assert named <= present, f"README layout lists {sorted(named - present)} not in comet_ray/{folder}"
    folders = {p.name for p in PACKAGE_DIR.iterdir() if (p / "__init__.py").exists()}
    assert folders == set(entries) - {""}, "README layout folders differ from the package's"
