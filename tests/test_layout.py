"""The house plan: dallm's import graph (every import statement, lazy ones too) has no cycle, no library
module imports a command module, and each wing imports only its own wing and the wings below it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dallm"
# Modules that serve both the library and a command (none today; `dallm kid` is dallm.measure.command).
LIBRARY_WITH_COMMAND: set[str] = set()
# Command-layer modules that no COMMANDS entry names: dallm.sweep.launch runs `dallm fit` for `dallm sweep`.
COMMAND_HELPERS = {"dallm.sweep.launch"}

# The wings, bottom to top (README "Layout"). A module may import its own wing and any wing below it, never
# one above. The training core sits at the bottom; the modules that wire a `dallm fit` run together
# (callbacks, the resume contract, preflight, the command table) sit above every wing they wire in;
# `dallm sweep` builds the fit parser and launches `dallm fit`, so it sits above the command table.
WINGS: list[tuple[str, set[str]]] = [
    ("core", {"dallm", "dallm.errors", "dallm.ranges", "dallm.manifest", "dallm.images", "dallm.base",
              "dallm.diffusion", "dallm.objective", "dallm.step", "dallm.cache", "dallm.lora", "dallm.tokens",
              "dallm.ema", "dallm.student", "dallm.module", "dallm.trainer", "dallm.resume", "dallm.sdxl",
              "dallm.optim"}),
    ("worlds", {"dallm.toy", "dallm.arch"}),
    ("teacher", {"dallm.teacher"}),
    ("data", {"dallm.data"}),  # the class images are made by the teacher wing's diffusers filler
    ("measure", {"dallm.measure"}),
    ("export", {"dallm.export"}),
    ("run", {"dallm.callbacks", "dallm.contract", "dallm.preflight", "dallm.cli"}),
    ("sweep", {"dallm.sweep"}),
    ("entry", {"dallm.__main__"}),
]  # fmt: skip


def wing_of(module: str, wings: list[tuple[str, set[str]]] = WINGS) -> int | None:
    """Index in `wings` of the module's wing: a listed module, or a module inside a listed package."""
    for i, (_, names) in enumerate(wings):
        if module in names or any(module.startswith(n + ".") for n in names - {"dallm"}):
            return i
    return None


def upward_imports(graph: dict[str, set[str]], wings: list[tuple[str, set[str]]] = WINGS) -> list[str]:
    """`module (wing) -> module (wing)` for every import of a wing above the importer's."""
    out = []
    for m, targets in graph.items():
        for t in targets:
            a, b = wing_of(m, wings), wing_of(t, wings)
            if a is not None and b is not None and b > a:
                out.append(f"{m} ({wings[a][0]}) -> {t} ({wings[b][0]})")
    return sorted(out)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports, from the source (no import is executed)."""
    mods: dict[str, Path] = {}
    for p in root.rglob("*.py"):
        rel = p.relative_to(root.parent).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        base = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    parts = base.split(".")[: len(base.split(".")) - node.level + 1]
                    mod = ".".join(parts + ([mod] if mod else []))
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]  # `from pkg import module`
            else:
                continue
            for t in targets:
                while t and t not in mods:  # `dallm.x.func` -> module dallm.x
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != m and t != root.name:
                    graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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


def command_modules(root: Path) -> set[str]:
    """The CLI layer: `cli`, `__main__` and the module of every entry of `cli.COMMANDS`."""
    pkg = root.name
    commands: set[str] = {f"{pkg}.cli", f"{pkg}.__main__"}
    for node in ast.walk(ast.parse((root / "cli.py").read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMMANDS" for t in node.targets):
            commands |= {v.value.split(":")[0] for v in node.value.values}  # "module:function"
    return commands


def layering_violations(root: Path, exempt: set[str] = frozenset()) -> list[str]:
    """`library -> command` edges: a library module that imports the CLI layer."""
    helpers = {h for h in COMMAND_HELPERS if h.split(".")[0] == root.name}
    graph, commands = import_graph(root), (command_modules(root) | helpers) - set(exempt)
    return sorted(
        f"{m} -> {t}" for m, targets in graph.items() if m not in commands for t in targets & commands
    )


def test_dallm_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert {"dallm.data.datamodule", "dallm.teacher.command", "dallm.base", "dallm.images"} <= graph.keys()
    assert "dallm.images" in graph["dallm.measure.kid"]  # lazy and top-level imports are both edges
    assert cycles(graph) == []


def test_no_library_module_imports_a_command_module():
    assert {"dallm.cli", "dallm.teacher.command"} <= command_modules(PACKAGE)
    assert layering_violations(PACKAGE, LIBRARY_WITH_COMMAND) == []


def test_the_checks_find_a_cycle_and_a_library_importing_a_command(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text('COMMANDS = {"go": "pkg.go:go_main"}\n')
    (pkg / "go.py").write_text("from pkg.lib import helper\n")
    (pkg / "lib.py").write_text("def helper():\n    from . import other\n")
    (pkg / "other.py").write_text("from pkg import lib\n\ndef f():\n    import pkg.go\n")
    graph = import_graph(pkg)
    assert graph["pkg.lib"] == {"pkg.other"} and graph["pkg.go"] == {"pkg.lib"}
    assert cycles(graph) == [["pkg.go", "pkg.lib", "pkg.other"]]
    assert layering_violations(pkg) == ["pkg.other -> pkg.go"]


def test_every_module_has_a_wing_and_no_wing_imports_one_above_it():
    graph = import_graph(PACKAGE)
    assert sorted(m for m in graph if wing_of(m) is None) == []
    assert {"dallm.data.datamodule", "dallm.measure.round", "dallm.export.command"} <= graph.keys()
    assert "dallm.teacher.pipeline" in graph["dallm.data.datamodule"]  # downward: allowed
    assert upward_imports(graph) == []


def test_the_wing_check_finds_an_upward_import():
    graph = {"dallm.base": {"dallm.data.datamodule"}, "dallm.data.datamodule": {"dallm.base"}, "dallm.x": set()}
    assert wing_of("dallm.x") is None and wing_of("dallm.data") == wing_of("dallm.data.stream") == 3
    assert upward_imports(graph) == ["dallm.base (core) -> dallm.data.datamodule (data)"]
