"""The house's plan, enforced: flows -> tasks -> llmops, never upward, no import cycles (function-level imports
count: a cycle through a lazy import is still a cycle a reader has to untangle), the trust wing and the pipeline
steps free of the heavy frameworks they must not need."""

import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT

LAYERS = {"llmops": 0, "tasks": 1, "flows": 2}


def _modules() -> dict[str, ast.Module]:
    mods = {}
    for pkg in LAYERS:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            mods[name] = (f, ast.parse(f.read_text(encoding="utf-8"), str(f)))
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in it, module level or inside functions)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for m, (f, tree) in mods.items():
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package this module is in
                    pkg = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            out |= {r for n in names if (r := resolve(n)) and r != m}
        graph[m] = out
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
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
            group = []
            while (w := stack.pop()) != v:
                on.discard(w)
                group.append(w)
            on.discard(v)
            if group:
                out.append(sorted([v, *group]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_layers_point_one_way_flows_tasks_llmops():
    graph = import_graph()
    upward = sorted(
        f"{a} imports {b}" for a, bs in graph.items() for b in bs if LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]]
    )
    assert upward == [], "imports against the layers (flows -> tasks -> llmops):\n" + "\n".join(upward)


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_find_an_upward_import_and_a_cycle():
    """The two checks above must be able to fail."""
    graph = {"llmops.a": {"tasks.b"}, "tasks.b": {"llmops.a"}, "flows.c": {"tasks.b"}}
    assert cycles(graph) == [["llmops.a", "tasks.b"]]
    assert [(a, b) for a, bs in graph.items() for b in bs if LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]]] == [
        ("llmops.a", "tasks.b")
    ]
    assert "tasks.privacy" in import_graph()["tasks.finetune"]  # a function-level import is seen


def test_the_trust_wing_imports_nothing_above_it_and_no_heavy_framework():
    graph = import_graph()
    wing = {m: bs for m, bs in graph.items() if m.startswith("llmops.governance")}
    assert len(wing) >= 8
    outside = sorted(
        f"{m} imports {b}"
        for m, bs in wing.items()
        for b in bs
        if not b.startswith(
            (
                "llmops.governance",
                "llmops.errors",
                "llmops.files",
                "llmops.config",
                "llmops.serving.settings",
                "llmops.text",
            )
        )
    )
    assert outside == []
    code = (
        "import sys, pkgutil, importlib, llmops.governance as g\n"
        "for m in pkgutil.iter_modules(g.__path__): importlib.import_module(f'llmops.governance.{m.name}')\n"
        "print(sorted(x for x in ('torch', 'prefect', 'mlflow', 'transformers', 'deepspeed', 'opacus') "
        "if x in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_pipeline_steps_are_plain_functions_prefect_wraps_them_in_flows_steps():
    offenders = []
    for f in sorted((ROOT / "tasks").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n == "prefect" or n.startswith("prefect.") for n in names):
                    offenders.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert offenders == [], "tasks/ imports Prefect (declare its @task in flows/steps.py): " + ", ".join(offenders)


class _Item:
    def __init__(self, path, fixtures=(), marks=()):
        self.fspath, self.fixturenames, self.nodeid, self.added = path, list(fixtures), str(path), []
        self._marks, self.keywords = [pytest.Mark(m, (), {}) for m in marks], {}

    def iter_markers(self):
        return iter(self._marks + self.added)

    def add_marker(self, mark):
        self.added.append(mark.mark)


def test_the_folder_sets_the_tier_and_a_unit_test_with_a_server_is_refused():
    from tests import conftest

    unit, integ = ROOT / "tests/unit/test_x.py", ROOT / "tests/integration/test_y.py"
    items = [_Item(unit, ["tmp_path"]), _Item(integ, ["prefect_harness"])]
    conftest.pytest_collection_modifyitems(None, items)
    assert [[m.name for m in i.added] for i in items] == [["unit"], ["integration"]]
    for bad in (_Item(unit, ["tmp_path", "mlflow_server"]), _Item(unit, marks=["integration"])):
        with pytest.raises(pytest.UsageError, match="move these to tests/integration/: .*tests/unit/test_x.py"):
            conftest.pytest_collection_modifyitems(None, [bad])
