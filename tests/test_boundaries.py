"""The library boundary: `modules`, `encoders`, `losses`, `evaluation` and `index` run in a
notebook with torch + transformers alone, so importing them must not import Ray or MLflow.

The packages are imported in one fresh interpreter (an import already made by another test
would hide the culprit; together they pass exactly when each does alone). A meta-path hook there records, for the first import of a forbidden module,
the chain of modules whose top-level code was running, so a failure names the raytrieve module
that pulled it in rather than only saying that it happened."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("ray", "mlflow")

PROBE = r"""
import json, sys

FORBIDDEN = set(sys.argv[2].split(","))
chains = {}


class Recorder:
    # Never finds anything itself: it only notes who imported first, then lets the real finders
    # work. importlib.util.find_spec probes (transformers checks whether mlflow is installed) do
    # not run through _find_and_load and are not imports.
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in FORBIDDEN and top not in chains:
            frame, chain, importing = sys._getframe(1), [], False
            while frame is not None:
                if frame.f_code.co_name == "_find_and_load" and frame.f_locals.get("name") == name:
                    importing = True
                module = frame.f_globals.get("__name__", "?")
                if frame.f_code.co_name == "<module>" and (not chain or chain[-1] != module):
                    chain.append(f"{module} (line {frame.f_lineno})")
                frame = frame.f_back
            if importing:
                chains[top] = list(reversed(chain)) + [name]
        return None


sys.meta_path.insert(0, Recorder())
for module in sys.argv[1].split(","):
    __import__(module)
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in FORBIDDEN)
print(json.dumps({"loaded": loaded, "chains": chains}))
"""


def _probe(module: str, forbidden: tuple[str, ...]) -> tuple[dict, str]:
    """(what importing ``module`` (or several, comma-separated) in a fresh interpreter loaded of
    ``forbidden``, the import chains)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, module, ",".join(forbidden)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, f"import {module} failed:\n{proc.stderr[-3000:]}"
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    return found, "\n".join(f"  {top}: " + " -> ".join(chain) for top, chain in found["chains"].items())


LIBRARY = ("modules", "encoders", "losses", "evaluation", "index")
# raytrieve.evaluation loads its evaluators on first use of their names: their modules are probed too.
EVALUATORS = ("base", "cross", "ir", "pairs")


def test_library_does_not_import_ray_or_mlflow():
    # One interpreter for the five (each costs ~4 s of torch and transformers imports alone).
    modules = [f"raytrieve.{p}" for p in LIBRARY] + [f"raytrieve.evaluation.{m}" for m in EVALUATORS]
    found, chains = _probe(",".join(modules), FORBIDDEN)
    assert not found["loaded"], (
        f"import raytrieve.{{{','.join(LIBRARY)}}} imported {found['loaded'][:8]}; the library must not import Ray or MLflow "
        f"(import them inside the function that needs them, or move that code to data/train/inference/serve/"
        f"tracking). Import chains:\n{chains}"
    )


@pytest.mark.parametrize("module", ["raytrieve.train.entry", "raytrieve.data.pipeline", "raytrieve.train.config",
                                    "raytrieve.data.train_source", "raytrieve.data.formats", "raytrieve.kinds",
                                    "raytrieve.wrapping_losses"])
def test_what_ray_unpickles_before_a_worker_needs_torch_does_not_import_it(module):
    """Ray Train's controller unpickles the train function, its spec and the datasets' stage
    functions; Ray Data's read and tokenize tasks unpickle the stage functions. Each does it in a
    process of its own that never runs a model: torch and transformers there cost about 3 s of
    imports on the critical path of every training run (measured: 21.5 s -> 16.9 s per run)."""
    found, chains = _probe(module, ("torch", "transformers", "sentence_transformers"))
    assert not found["loaded"], f"import {module} imported {found['loaded'][:8]}. Import chains:\n{chains}"


@pytest.mark.parametrize("module", ["raytrieve.evaluation.metrics", "raytrieve.evaluate.report",
                                    "raytrieve.evaluate.run", "raytrieve.evaluate.tune"])
def test_what_an_evaluation_checks_before_its_models_load_does_not_import_torch(module):
    """`raytrieve evaluate` checks its arguments, files, --compare report and --serve-config with
    these before any model loads: a mistake there is reported in well under a second, not after
    ~5 s of torch and transformers imports."""
    found, chains = _probe(module, ("torch", "transformers", "sentence_transformers"))
    assert not found["loaded"], f"import {module} imported {found['loaded'][:8]}. Import chains:\n{chains}"


def test_the_evaluation_package_names_each_evaluator_its_modules_define():
    """raytrieve.evaluation's lazily loaded names are exactly the public classes of its evaluator
    modules, each the class its module defines."""
    import importlib
    import inspect

    import raytrieve.evaluation as evaluation

    defined = {}
    for name in EVALUATORS:
        module = importlib.import_module(f"raytrieve.evaluation.{name}")
        defined |= {n: o for n, o in vars(module).items()
                    if inspect.isclass(o) and o.__module__ == module.__name__ and not n.startswith("_")}
    assert sorted(evaluation.__all__) == sorted(defined)
    assert all(getattr(evaluation, n) is cls for n, cls in defined.items())
    with pytest.raises(AttributeError, match="no attribute 'NoSuchEvaluator'"):
        _ = evaluation.NoSuchEvaluator


def test_probe_names_the_importing_module(tmp_path):
    """The chain really points at the culprit: a throwaway package that only probes for `wave`
    (find_spec, as transformers probes for mlflow) and then imports it in a submodule is
    reported as pkg -> pkg.sub -> wave."""
    pkg = tmp_path / "boundary_probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import importlib.util\nimportlib.util.find_spec('wave')\nfrom boundary_probe_pkg import sub\n"
    )
    (pkg / "sub.py").write_text("\n\nimport wave\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "boundary_probe_pkg", "wave"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["loaded"] == ["wave"]
    chain = found["chains"]["wave"]
    assert [c.split(" ")[0] for c in chain] == ["__main__", "boundary_probe_pkg", "boundary_probe_pkg.sub", "wave"], (
        chain
    )
    assert chain[2] == "boundary_probe_pkg.sub (line 3)"


# -- import cycles -------------------------------------------------------------------------------


def import_graph(root: Path, *, in_functions: bool = False) -> dict[str, set[str]]:
    """Each module of the package at ``root`` -> the modules of that package it imports.

    Only what runs at import counts unless ``in_functions``: function bodies and ``if
    TYPE_CHECKING:`` blocks are skipped. Importing ``a.b.c`` first runs ``a`` and ``a.b``, so
    those are edges too, except the importer's own packages (already running when it runs)."""
    files = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f

    def nearest(name: str) -> str:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, f in files.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()

        def visit(nodes: list[ast.stmt], package: str = package, targets: set[str] = targets) -> None:
            for node in nodes:
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    visit(node.orelse)
                    continue
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not in_functions:
                    continue
                if isinstance(node, ast.Import):
                    targets.update(nearest(a.name) for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        up = package.split(".")[: len(package.split(".")) - node.level + 1]
                        base = ".".join([*up, base] if base else up)
                    targets.update(nearest(f"{base}.{a.name}") for a in node.names)
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.stmt):
                        visit([child])
                    elif isinstance(child, ast.excepthandler):
                        visit(child.body)

        visit(ast.parse(f.read_text(encoding="utf-8")).body)
        pieces = [t.split(".") for t in targets if t]
        graph[name] = {
            parent
            for p in pieces
            for i in range(1, len(p) + 1)
            if (parent := ".".join(p[:i])) in files and not (name == parent or name.startswith(parent + "."))
        }
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            nxt = next((w for w in edges if w not in index or w in on_stack), None)
            if nxt is not None:
                if nxt in index:
                    low[node] = min(low[node], index[nxt])
                else:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_no_import_cycles_between_raytrieve_modules():
    """What runs at import forms no cycle: a module is never imported half-initialised, and
    every module can be imported first (by a Ray worker unpickling a function, say)."""
    cycles = find_cycles(import_graph(ROOT / "platform" / "raytrieve"))
    assert not cycles, (
        f"import cycles among raytrieve modules: {cycles}; move the shared code into a module both can "
        "import, or import inside the function that needs it (a call-time edge)"
    )


def test_model_catalogue_is_a_leaf():
    """assets.py (models/ catalogue) imports no encoder, not even inside a function: converting
    shipped weights is encoders/convert.py's work, reached through raytrieve.model_ref."""
    graph = import_graph(ROOT / "platform" / "raytrieve", in_functions=True)
    assert graph["raytrieve.assets"] <= {"raytrieve.errors", "raytrieve.config", "raytrieve.kinds"}, graph["raytrieve.assets"]
    assert graph["raytrieve.config"] <= {"raytrieve.errors"} and not graph["raytrieve.errors"]
    assert graph["raytrieve.kinds"] <= {"raytrieve.errors"}  # the kind table names its classes by path


def test_cycle_check_finds_a_cycle(tmp_path):
    """The checker sees a cycle through a relative import and a package's __init__ (running
    pkg.a runs pkg/sub/__init__, which imports pkg.a back), and ignores TYPE_CHECKING and
    function-level imports."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg import a\n")
    (pkg / "sub" / "b.py").write_text("")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\ndef f():\n    from pkg import d\n"
    )
    (pkg / "d.py").write_text("import pkg.c\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.d"] == {"pkg.c"} and not graph["pkg.c"]
    assert find_cycles(graph) == [["pkg.a", "pkg.sub"]]
    assert sorted(find_cycles(import_graph(pkg, in_functions=True))) == [["pkg.a", "pkg.sub"], ["pkg.c", "pkg.d"]]
