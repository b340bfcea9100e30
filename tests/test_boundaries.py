"""The library boundary: `modules`, `encoders`, `losses`, `evaluation` and `index` run in a
notebook with torch + transformers alone, so importing them must not import Ray or MLflow.

Each package is imported in a fresh interpreter (an import already made by another test would
hide the culprit). A meta-path hook there records, for the first import of a forbidden module,
the chain of modules whose top-level code was running, so a failure names the raytrieve module
that pulled it in rather than only saying that it happened."""

from __future__ import annotations

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
__import__(sys.argv[1])
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in FORBIDDEN)
print(json.dumps({"loaded": loaded, "chains": chains}))
"""


def _probe(module: str, forbidden: tuple[str, ...]) -> tuple[dict, str]:
    """(what importing ``module`` in a fresh interpreter loaded of ``forbidden``, the import chains)."""
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


@pytest.mark.parametrize("package", ["modules", "encoders", "losses", "evaluation", "index"])
def test_library_does_not_import_ray_or_mlflow(package):
    found, chains = _probe(f"raytrieve.{package}", FORBIDDEN)
    assert not found["loaded"], (
        f"import raytrieve.{package} imported {found['loaded'][:8]}; the library must not import Ray or MLflow "
        f"(import them inside the function that needs them, or move that code to data/train/inference/serve/"
        f"tracking). Import chains:\n{chains}"
    )


@pytest.mark.parametrize("module", ["raytrieve.train.entry", "raytrieve.data.pipeline", "raytrieve.train.config"])
def test_what_ray_unpickles_before_a_worker_needs_torch_does_not_import_it(module):
    """Ray Train's controller unpickles the train function, its spec and the datasets' stage
    functions; Ray Data's read and tokenize tasks unpickle the stage functions. Each does it in a
    process of its own that never runs a model: torch and transformers there cost about 3 s of
    imports on the critical path of every training run (measured: 21.5 s -> 16.9 s per run)."""
    found, chains = _probe(module, ("torch", "transformers", "sentence_transformers"))
    assert not found["loaded"], f"import {module} imported {found['loaded'][:8]}. Import chains:\n{chains}"


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
