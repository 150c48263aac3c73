"""The package's import structure: no cycle among its modules, and every module imports on its own.

Ops are declared in `kvsurgery.ops` and registered by one call; a module that imported back into a partly
initialised one (the old ops -> kernels -> ... -> store -> ops loop) would fail one of these.
"""

import ast
import pathlib
import subprocess
import sys
import textwrap

import kvsurgery

ROOT = pathlib.Path(kvsurgery.__file__).parent
PASSES = ROOT.parent / "passes"  # installed as kvsurgery.passes (pyproject package-dir)


def package_modules(root: pathlib.Path, package: str, extra: dict[str, pathlib.Path] | None = None) -> dict:
    """Module name -> source file, for every .py under `root` (as `package`) and the `extra` package folders."""
    found = {}
    for base, name in [(root, package), *((path, pkg) for pkg, path in (extra or {}).items())]:
        for path in sorted(base.rglob("*.py")):
            parts = [*path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([name, *parts])] = path
    return found


def top_level_imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The package modules `name` imports at module level (not inside functions), resolved to module names."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.parse(path.read_text()).body:
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target and target not in modules:  # `import a.b.c` names a.b.c; a dotted attribute its module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path [a, b, ..., a], or None when it is acyclic."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph(root: pathlib.Path, package: str, extra=None) -> dict[str, set[str]]:
    modules = package_modules(root, package, extra)
    return {name: top_level_imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycle_among_the_package_modules():
    graph = import_graph(ROOT, "kvsurgery", {"kvsurgery.passes": PASSES})
    assert len(graph) > 50 and "kvsurgery.ops.core" in graph["kvsurgery.ops"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_reports_a_cycle(tmp_path):
    pkg = tmp_path / "loop"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from loop.b import B\nA = 1\n")
    (pkg / "b.py").write_text("from loop import c\nB = 2\n")
    (pkg / "c.py").write_text("import loop.a\n")
    assert find_cycle(import_graph(pkg, "loop")) == ["loop.a", "loop.b", "loop.c", "loop.a"]


# Imports each module with no kvsurgery module loaded before it; prints the failures, one per line.
IMPORT_EACH = textwrap.dedent(
    """
    import importlib, sys, traceback
    failed = []
    for name in sys.argv[1:]:
        for loaded in [m for m in sys.modules if m.split(".")[0] in ({name.split(".")[0]})]:
            del sys.modules[loaded]
        try:
            importlib.import_module(name)
        except Exception as exc:
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    print("\\n".join(failed))
    """
)


def import_each(names: list[str], path: pathlib.Path) -> list[str]:
    env_path = [str(path), *sys.path]
    code = f"import sys; sys.path[:0] = {env_path!r}\n" + IMPORT_EACH
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if line]


def test_every_module_imports_on_its_own():
    names = list(package_modules(ROOT, "kvsurgery", {"kvsurgery.passes": PASSES}))
    failures = import_each(names, ROOT.parent)
    # the kvpress comparison runs in kvpress's own environment; without it only its absence may fail
    no_kvpress = {f"{n}: ModuleNotFoundError: No module named 'kvpress'" for n in names if "kvpress" in n}
    assert set(failures) <= no_kvpress, failures


def test_importing_on_its_own_catches_a_cycle(tmp_path):
    pkg = tmp_path / "loopy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from loopy.b import B\nA = 1\n")
    (pkg / "b.py").write_text("B = 2\nfrom loopy.a import A\n")  # a bottom import: fine when b comes first
    failures = import_each(["loopy.a", "loopy.b"], tmp_path)
    assert len(failures) == 1 and failures[0].startswith("loopy.a: ImportError")
