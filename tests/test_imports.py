"""The import rules of the package layout (issue 11), read from the source with ``ast``:

- no import cycle among project modules, counting imports inside functions too (a lazy
  import hides a cycle from Python, not from a reader);
- the library (``lesft/`` outside ``lesft/cli/``) imports nothing from ``workers``,
  ``broker`` or ``bench``; ``workers/`` imports nothing from the CLI;
- the wire codec and the round state machine import no zmq.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lesft", "workers", "broker", "bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imported(path: Path, name: str) -> set[str]:
    """Every module named by an import anywhere in the file (``from a import b`` names ``a``
    and, when ``a.b`` is a module, ``a.b``; a relative import is resolved against ``name``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (a package's ``__init__`` counts
    as the module named by the package)."""
    modules = _modules()
    return {name: {m for m in _imported(path, name) if m in modules and m != name}
            for name, path in modules.items()}


def _external(name: str) -> set[str]:
    return {m.split(".")[0] for m in _imported(_modules()[name], name)}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    src = tmp_path / "pkg" / "sub"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("")
    mod = src / "mod.py"
    mod.write_text("def f():\n    from ..other import thing\n    import zmq.auth\nfrom . import sibling\n")
    assert _imported(mod, "pkg.sub.mod") >= {"pkg.other", "pkg.other.thing", "zmq.auth", "pkg.sub", "pkg.sub.sibling"}
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_project_modules():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_library_imports_no_workers_broker_or_bench():
    bad = [f"{name} imports {m}" for name, deps in _graph().items()
           if _in(name, "lesft") and not _in(name, "lesft.cli")
           for m in deps if any(_in(m, p) for p in ("workers", "broker", "bench"))]
    assert not bad, bad


def test_workers_import_nothing_from_the_cli():
    bad = [f"{name} imports {m}" for name, deps in _graph().items() if _in(name, "workers")
           for m in deps if _in(m, "lesft.cli")]
    assert not bad, bad


@pytest.mark.parametrize("name", ["lesft.wire", "lesft.rounds"])
def test_pure_modules_import_no_zmq(name):
    if name not in _modules():
        pytest.skip(f"{name} does not exist yet")
    assert "zmq" not in _external(name)
