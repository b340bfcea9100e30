"""Real text for benchmarks: docstrings of installed packages, read with ``ast`` (nothing is
imported), cut into sentences of a chosen word-length range. Deterministic for a seed."""

from __future__ import annotations

import ast
import functools
import importlib.util
import random
import re
from pathlib import Path

PACKAGES = ("numpy", "transformers", "pyarrow", "ray", "torch", "datasets", "mlflow")


@functools.cache  # parsing the packages takes a minute or more on 2 cores; a script asks several times
def docstrings(packages: tuple[str, ...] = PACKAGES, max_files: int = 4000) -> tuple[str, ...]:
    out: list[str] = []
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        for path in sorted(root.rglob("*.py"))[:max_files]:
            try:
                tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef, ast.Module)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        out.append(doc)
    return tuple(out)


def sentences(n: int, min_words: int = 5, max_words: int = 120, seed: int = 0) -> list[str]:
    """``n`` texts whose word counts are uniform in [min_words, max_words]."""
    rng = random.Random(seed)
    words = re.sub(r"\s+", " ", " ".join(docstrings())).split(" ")
    if len(words) < max_words * 10:
        raise RuntimeError("not enough installed docstring text to build benchmark sentences")
    out = []
    for _ in range(n):
        length = rng.randint(min_words, max_words)
        start = rng.randrange(0, len(words) - length)
        out.append(" ".join(words[start : start + length]))
    return out
