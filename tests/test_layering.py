"""The package's shape: the library imports nothing from the toy world, and no two modules import each
other (directly or around a loop), whether at the top of a file or inside a function."""

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def graph(package: str) -> dict[str, set[str]]:
    modules = {module_name(p): p for p in (SRC / package).rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_library_imports_nothing_from_the_toy_world():
    offenders = {name: sorted(m for m in imports(path) if m.startswith("dina_lrm_toyworld"))
                 for name, path in ((module_name(p), p) for p in (SRC / "dina_lrm").rglob("*.py"))}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_no_import_cycles_in_the_library():
    edges = graph("dina_lrm")
    for name in edges:
        edges[name].discard("dina_lrm")  # the package's lazy top-level exports
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_the_toy_world_uses_only_the_public_api():
    """It plugs in as a user's code would: names from ``dina_lrm`` itself (its ``__all__``) and the tiny
    test models of ``dina_lrm.testing``, never a library module's internals."""
    import dina_lrm

    reached, unknown = {}, {}
    for path in (SRC / "dina_lrm_toyworld").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            inside = [m for m in modules if m.startswith("dina_lrm.")]
            if inside and not all(m.startswith("dina_lrm.testing") for m in inside):
                reached.setdefault(path.name, []).extend(inside)
            if isinstance(node, ast.ImportFrom) and node.module == "dina_lrm":
                missing = [a.name for a in node.names if a.name not in dina_lrm.__all__]
                if missing:
                    unknown[path.name] = missing
    assert reached == {} and unknown == {}
