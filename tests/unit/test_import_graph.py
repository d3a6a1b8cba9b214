# The import graph of mgt_scale has no cycle (issue #29): every module is read with `ast` (module-level
# and function-level imports, relative imports resolved), the graph of mgt_scale-internal edges is built,
# and a cycle fails the test naming its modules in order. A lazy import inside a function is an edge
# too: it hides a cycle from the interpreter, not from the design.
from __future__ import annotations

import ast
from pathlib import Path

import mgt_scale

ROOT = Path(mgt_scale.__file__).resolve().parent
PKG = "mgt_scale"


def module_names() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (packages by their __init__)."""
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _resolve(name: str, known: dict) -> str | None:
    """The longest known module that `name` names or lies in (an imported attribute maps to its module)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(mod: str, path: Path, known: dict) -> set[str]:
    """mgt_scale modules that `mod` imports anywhere in its file."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import sub`: an edge to pkg.sub where sub is a module, else to pkg
            targets = [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t == PKG or t.startswith(PKG + "."):
                r = _resolve(t, known)
                if r and r != mod:
                    found.add(r)
    return found


def import_graph() -> dict[str, set[str]]:
    known = module_names()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search, three colours)."""
    colour = {m: 0 for m in graph}
    for root in sorted(graph):
        if colour[root]:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            nxt = next(children, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
                continue
            if nxt not in colour:
                continue
            if colour[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            if colour[nxt] == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (each holds at least one cycle)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:  # Tarjan; the graph is a few hundred nodes, recursion is fine
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_finder_sees_a_cycle_and_its_absence():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_relative_and_function_level_imports_are_edges(tmp_path):
    pkg = tmp_path / "mgt_scale" / "sub"
    pkg.mkdir(parents=True)
    f = pkg / "a.py"
    f.write_text("from . import b\n\ndef g():\n    from ..other import thing\n    import mgt_scale.sub.c\n")
    known = {"mgt_scale": None, "mgt_scale.sub": None, "mgt_scale.sub.a": f, "mgt_scale.sub.b": None,
             "mgt_scale.sub.c": None, "mgt_scale.other": None}
    assert imports_of("mgt_scale.sub.a", f, known) == {"mgt_scale.sub.b", "mgt_scale.other", "mgt_scale.sub.c"}


def test_no_import_cycle_in_mgt_scale():
    graph = import_graph()
    assert len(graph) > 50  # the walk found the package
    cycles = all_cycles(graph)
    if cycles:
        lines = []
        for comp in cycles:
            sub = {m: graph[m] & set(comp) for m in comp}
            lines.append(" -> ".join(find_cycle(sub)) + f"   (component: {', '.join(comp)})")
        raise AssertionError("import cycles in mgt_scale:\n" + "\n".join(lines))
