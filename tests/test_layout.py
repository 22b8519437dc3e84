"""The house stays readable: imports go one way and no room grows too long (parsed, never imported).

Layers, bottom up: ``fuseseg`` (foundations: data layer, runtime, errors, progress, logging) <-
``fusion`` and ``segmentation`` (each stands on ``fuseseg`` only; ``segmentation`` never imports
``fusion``) <- ``pipelines``. Inside ``pipelines`` the orchestration (``pipelines.run``) calls the
stages (``pipelines.stages.*``), which hand their jobs to the executor (``pipelines.executor``,
``pipelines.jobs``); none of these imports one above it, and only the front doors (``cli``,
``api``, ``commands``) import those. Every import statement counts, also one inside a function,
and no two modules may import each other through any chain (no import circles).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fuseseg", "fusion", "segmentation", "pipelines")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 550, 90

# which top-level packages each package may import (third-party and the standard library aside)
ALLOWED = {"fuseseg": {"fuseseg"}, "fusion": {"fuseseg", "fusion"}, "segmentation": {"fuseseg", "segmentation"},
           "pipelines": {"fuseseg", "fusion", "segmentation", "pipelines"}}
# deliberate exceptions, each with its reason
ALLOWED_EDGES = {("pipelines.commands.bench", "benchmarks.__main__"):
                 "`fuseseg bench` is the front door of the checkout's benchmarks (not installed)"}
# inside pipelines: a module of the left group never imports one of the right group (upward)
PIPELINE_LAYERS = [
    ({"pipelines.executor", "pipelines.jobs", "pipelines.runstate", "pipelines.memory", "pipelines.config",
      "pipelines.console", "pipelines.experiment", "pipelines.report", "pipelines.figures",
      "pipelines.report_page", "pipelines.report_text", "pipelines.report_tables", "pipelines.analysis",
      "pipelines.stats"},
     ("pipelines.stages", "pipelines.run", "pipelines.commands", "pipelines.api", "pipelines.cli")),
    ({"pipelines.stages"}, ("pipelines.run", "pipelines.commands", "pipelines.api", "pipelines.cli")),
    ({"pipelines.run"}, ("pipelines.commands", "pipelines.api", "pipelines.cli")),
]
LONG_MODULES = {"fusion/_metric_kernels.py": "the numba kernels of every metric, compiled and cached together"}


def module_sources(root: Path, packages=PACKAGES + ("benchmarks",)) -> dict[str, tuple[str, bool]]:
    """{dotted module name: (source, is_package)} of every module under ``packages``."""
    out = {}
    for pkg in packages:
        for p in sorted((root / pkg).rglob("*.py")):
            parts = list(p.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join(parts)] = (p.read_text(), is_pkg)
    return out


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """{module: the project modules it imports} from every import statement (function-level too).
    ``from a.b import c`` names module ``a.b.c`` when that is a module, else ``a.b``."""
    known = set(sources)
    graph: dict[str, set[str]] = {}
    for mod, (src, is_pkg) in sources.items():
        package = mod if is_pkg else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(src)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for t in targets:
                while t and t not in known:   # `import a.b.c` of a module we know as a.b
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    deps.add(t)
        graph[mod] = deps
    return graph


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        top = mod.split(".")[0]
        for dep in sorted(deps):
            if top in ALLOWED and dep.split(".")[0] not in ALLOWED[top] and (mod, dep) not in ALLOWED_EDGES:
                bad.append(f"{mod} imports {dep}")
            for lower, upper in PIPELINE_LAYERS:
                in_lower = any(mod == m or mod.startswith(m + ".") for m in lower)
                if in_lower and any(dep == u or dep.startswith(u + ".") for u in upper) and \
                        not any(dep == m or dep.startswith(m + ".") for m in lower):
                    bad.append(f"{mod} imports {dep} (upward in pipelines)")
    return bad


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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


def test_imports_go_one_way_and_never_in_a_circle():
    graph = import_graph(module_sources(REPO))
    assert len(graph) > 50 and "fuseseg.data.io" in graph["segmentation.data"]   # the parser sees the imports
    assert layer_violations(graph) == []
    assert import_circles(graph) == []


def test_the_checks_catch_an_upward_import_and_a_circle():
    """The checker itself can fail: a fake tree with the import circles this layout removed."""
    fake = {
        "fuseseg": ("", True), "fuseseg.data": ("", True),
        "fuseseg.data.io": ("from fusion.fuse import sha256\n", False),            # foundations -> fusion
        "fusion": ("", True),
        "fusion.fuse": ("def f():\n    from fusion.pretrained import sha256\n", False),
        "fusion.pretrained": ("from fusion.fuse import sha256\n", False),           # a circle
        "segmentation": ("", True),
        "segmentation.data": ("from fusion.models.sspfusion import SSPFusion\n", False),   # sideways
        "pipelines": ("", True), "pipelines.stages": ("", True),
        "pipelines.executor": ("from pipelines.stages.base import STAGES\n", False),       # upward
        "pipelines.stages.base": ("from ..executor import Executor\n", False),
    }
    graph = import_graph(fake)
    assert graph["pipelines.stages.base"] == {"pipelines.executor"}    # relative imports resolve
    bad = layer_violations(graph)
    assert "fuseseg.data.io imports fusion.fuse" in bad and "segmentation.data imports fusion" in bad
    assert "pipelines.executor imports pipelines.stages.base (upward in pipelines)" in bad
    assert sorted(import_circles(graph)) == [["fusion.fuse", "fusion.pretrained"],
                                             ["pipelines.executor", "pipelines.stages.base"]]


def long_rooms(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Modules over MAX_MODULE_LINES and functions over MAX_FUNCTION_LINES (lines, docstrings included)."""
    modules, functions = {}, {}
    for pkg in PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")):
            src, rel = p.read_text(), p.relative_to(root).as_posix()
            if len(src.splitlines()) > MAX_MODULE_LINES:
                modules[rel] = len(src.splitlines())
            for node in ast.walk(ast.parse(src)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        functions[f"{rel}:{node.lineno} {node.name}"] = n
    return modules, functions


def test_no_module_and_no_function_is_too_long():
    modules, functions = long_rooms(REPO)
    assert functions == {}, f"functions over {MAX_FUNCTION_LINES} lines: split them into named steps"
    assert set(modules) == set(LONG_MODULES), f"modules over {MAX_MODULE_LINES} lines: {modules}"


def test_the_length_check_finds_a_long_function(tmp_path):
    (tmp_path / "fusion").mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "fusion" / "long.py").write_text("def long():\n" + body + "\n" * MAX_MODULE_LINES)
    for pkg in PACKAGES[:1] + PACKAGES[2:]:
        (tmp_path / pkg).mkdir()
    modules, functions = long_rooms(tmp_path)
    assert modules == {"fusion/long.py": MAX_FUNCTION_LINES + 1 + MAX_MODULE_LINES}
    assert functions == {"fusion/long.py:1 long": MAX_FUNCTION_LINES + 1}


@pytest.mark.parametrize("old, new", [("pipelines.stages", "TrainFusionJob"), ("pipelines.stages", "SegmentJob"),
                                      ("fusion.train", "FusionTrainConfig")])
def test_job_pickles_of_the_old_layout_still_load(old, new):
    """A queued or requeued job of fuseseg 0.1.0 is a pickle naming its classes by their old modules."""
    import importlib
    import pickle

    cls = getattr(importlib.import_module(old), new)
    blob = pickle.dumps(cls, protocol=0).replace(cls.__module__.encode(), old.encode())
    assert f"c{old}\n{new}\n".encode() in blob and pickle.loads(blob) is cls
