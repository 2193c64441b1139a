"""The import graph between fedge's packages is the one written in ARCHITECTURE.md ("Layering").

Every module of every package is parsed (ast, nothing imported) and each ``fedge.*`` import, at module
level or inside a function, must be an allowed edge. Third-party imports that must never reach the agent
(TensorFlow, torch, onnx, keras, scikit-learn, matplotlib, amqtt) are checked the same way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> folder in the repository (the setuptools package-dir mapping in pyproject.toml)
FOLDERS: dict[str, Path] = {
    "fedge.protocol": ROOT / "protocol",
    "fedge.core": ROOT / "src" / "fedge" / "core",
    "fedge.runtime": ROOT / "src" / "fedge" / "runtime",
    "fedge.datasets": ROOT / "src" / "fedge" / "datasets",
    "fedge.edge_agent": ROOT / "edge_agent",
    "fedge.export": ROOT / "export",
    "fedge.hub": ROOT / "hub",
    "fedge.devices": ROOT / "devices",
    "fedge": ROOT / "src" / "fedge",  # the umbrella CLI and the demo (top-level modules only)
}

# The allowed graph (ARCHITECTURE.md): who may import whom, besides itself.
ALLOWED: dict[str, set[str]] = {
    "fedge.protocol": set(),
    "fedge.core": {"fedge.protocol"},
    "fedge.runtime": {"fedge.protocol", "fedge.core"},
    "fedge.datasets": {"fedge.protocol"},
    "fedge.edge_agent": {"fedge.protocol", "fedge.core", "fedge.runtime"},
    "fedge.export": {"fedge.protocol", "fedge.core", "fedge.runtime", "fedge.datasets"},
    "fedge.hub": {"fedge.protocol", "fedge.core", "fedge.runtime", "fedge.datasets"},
    "fedge.devices": {"fedge.protocol"},
    "fedge": {
        "fedge.protocol", "fedge.core", "fedge.runtime", "fedge.datasets", "fedge.edge_agent", "fedge.export",
        "fedge.hub", "fedge.devices",
    },
}

# Third-party packages a package must never import, even lazily.
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    "fedge.protocol": {"tensorflow", "keras", "torch", "onnx", "sklearn", "matplotlib", "amqtt", "ai_edge_litert"},
    "fedge.core": {
        "tensorflow", "keras", "torch", "onnx", "onnxruntime", "sklearn", "matplotlib", "amqtt", "ai_edge_litert",
        "tflite_runtime", "paho", "sqlite3", "socket", "time",
    },
    "fedge.runtime": {"tensorflow", "keras", "torch", "onnx", "sklearn", "matplotlib", "amqtt", "paho"},
    "fedge.edge_agent": {"tensorflow", "keras", "torch", "onnx", "sklearn", "matplotlib", "amqtt"},
    "fedge.devices": {"tensorflow", "keras", "torch", "onnx", "amqtt"},
}

PACKAGES = sorted(ALLOWED, key=len, reverse=True)  # longest first: "fedge.hub" before "fedge"


def package_of(module: str) -> str | None:
    """The fedge package a dotted module name belongs to (``fedge.hub.daemon`` -> ``fedge.hub``)."""
    for pkg in PACKAGES:
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return None


def modules_of(pkg: str) -> list[tuple[str, Path]]:
    folder = FOLDERS[pkg]
    files = sorted(folder.glob("*.py")) if pkg == "fedge" else sorted(folder.rglob("*.py"))
    out = []
    for f in files:
        rel = f.relative_to(folder).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out.append((".".join([pkg, *parts]), f))
    return out


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    """Every absolute module name imported by ``path`` (relative imports resolved), with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from fedge import hub` imports the package fedge.hub
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names
                      if package_of(f"{target}.{alias.name}") not in (None, package_of(target))]
    return found


def violations(pkg: str, modules: list[tuple[str, Path]]) -> list[str]:
    bad = []
    for module, path in modules:
        for line, target in imports_of(module, path):
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"
            top = target.split(".")[0]
            if top in {"hub", "export", "protocol", "devices", "edge_agent"}:
                bad.append(f"{where}: imports {target!r}: use the fedge namespace (fedge.{target})")
                continue
            if top in FORBIDDEN_THIRD_PARTY.get(pkg, set()):
                bad.append(f"{where}: {pkg} must not import {top}")
                continue
            dep = package_of(target)
            if dep is None or dep == pkg or target == "fedge":  # the root package itself holds only __version__
                continue
            if dep not in ALLOWED[pkg]:
                bad.append(f"{where}: {pkg} -> {dep} is not an allowed edge ({target})")
    return bad


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_imports_follow_the_documented_graph(pkg: str) -> None:
    modules = modules_of(pkg)
    assert modules, f"no modules found for {pkg} in {FOLDERS[pkg]}"
    assert violations(pkg, modules) == []


def test_every_package_folder_is_covered() -> None:
    """A new folder of Python code under the mapped roots must be added to the graph (and to ARCHITECTURE.md)."""
    mapped = {p.resolve() for p in FOLDERS.values()}
    src_subpackages = {p.parent.resolve() for p in (ROOT / "src" / "fedge").glob("*/__init__.py")}
    assert src_subpackages <= mapped, f"unmapped sub-packages: {sorted(map(str, src_subpackages - mapped))}"


def test_the_checker_catches_forbidden_edges(tmp_path: Path) -> None:
    """The check itself can fail: planted forbidden imports are reported, allowed ones are not."""
    planted = tmp_path / "planted.py"
    planted.write_text(
        "from fedge.protocol.codec import encode\n"        # allowed
        "def f():\n"
        "    from fedge.hub.daemon import HubDaemon\n"      # agent -> hub: forbidden, even lazily
        "    import fedge.export.zoo\n"                     # agent -> export: forbidden
        "    import tensorflow\n"                           # agent -> tensorflow: forbidden
        "    from protocol import codec\n"                  # old top-level name
        "from fedge import hub\n"                           # package import through `from fedge import`
    )
    bad = violations("fedge.edge_agent", [("fedge.edge_agent.planted", planted)])
    assert len(bad) == 5, bad
    assert any("fedge.edge_agent -> fedge.hub" in b for b in bad)
    assert any("fedge.edge_agent -> fedge.export" in b for b in bad)
    assert any("tensorflow" in b for b in bad)
    assert any("use the fedge namespace" in b for b in bad)
    assert violations("fedge", [("fedge.planted", planted)]) == [
        b for b in violations("fedge", [("fedge.planted", planted)]) if "use the fedge namespace" in b
    ]


def test_relative_imports_are_resolved(tmp_path: Path) -> None:
    pkg_dir = tmp_path / "p"
    pkg_dir.mkdir()
    planted = pkg_dir / "m.py"
    planted.write_text("from ..hub import daemon\nfrom . import sibling\n")
    found = [t for _, t in imports_of("fedge.protocol.m", planted)]
    assert "fedge.hub" in found and "fedge.protocol" in found
    assert violations("fedge.protocol", [("fedge.protocol.m", planted)]) != []


def module_graph(modules: list[tuple[str, Path]]) -> dict[str, set[str]]:
    """Module -> the fedge modules it imports (lazy and TYPE_CHECKING imports included; ``from pkg import mod``
    counts as importing ``pkg.mod`` when that is a module)."""
    names = {m for m, _ in modules}
    graph: dict[str, set[str]] = {}
    for module, path in modules:
        out = set()
        targets = [t for _line, t in imports_of(module, path)]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets += [f"{node.module}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in names:
                target = target.rpartition(".")[0]
            if target and target != module:
                out.add(target)
        graph[module] = out
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _all_modules() -> list[tuple[str, Path]]:
    return [m for pkg in ALLOWED for m in modules_of(pkg)]


def test_no_module_imports_itself_through_others() -> None:
    """No import cycle between fedge modules, lazy imports included (a cycle closed inside a function is still a
    cycle: the two modules cannot be understood or tested apart)."""
    assert cycles(module_graph(_all_modules())) == []


def test_the_cycle_check_can_fail(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text("from fedge.hub import b\n")
    b.write_text("def f():\n    import fedge.hub.a\n")  # lazily: still a cycle
    c.write_text("from fedge.hub.a import x\n")
    graph = module_graph([("fedge.hub.a", a), ("fedge.hub.b", b), ("fedge.hub.c", c)])
    assert cycles(graph) == [["fedge.hub.a", "fedge.hub.b"]]


def test_the_hub_and_the_agent_never_import_each_other() -> None:
    graph = module_graph(_all_modules())
    crossing = sorted((m, t) for m, ts in graph.items() for t in ts
                      if (package_of(m), package_of(t)) in {("fedge.hub", "fedge.edge_agent"),
                                                            ("fedge.edge_agent", "fedge.hub")})
    assert crossing == []
