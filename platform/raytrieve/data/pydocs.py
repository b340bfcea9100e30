"""Offline retrieval data from the docstrings of installed packages.

Each documented function or class gives a (query, document) pair: the query is the
docstring's summary (its first sentence, however many lines it wraps over), the document is
the object's signature plus the rest of the docstring. Pairs are deduplicated (on query and on
document), and split by package: train packages to fine-tune on, dev packages to choose
settings on (``/search``'s fit), test packages to report. Dev and test are never trained on, and
dev is never tested on; like test, dev is of packages the models never saw, so a setting chosen
on dev is chosen for what test asks. Files are read with ``ast``; nothing is imported.

    raytrieve data build-pydocs --out data/pydocs
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

TRAIN_PACKAGES = ("torch", "transformers", "ray", "pyarrow", "mlflow", "datasets")
# Scientific packages documented in numpydoc, as the test packages are (a dev split of held-out
# train-package pairs fitted fusions that won there and lost on numpy and scipy: README, demo).
DEV_PACKAGES = ("pandas", "sklearn")
TEST_PACKAGES = ("numpy", "scipy")
SPLITS = ("train", "dev", "test")
PACKAGES = {"train": TRAIN_PACKAGES, "dev": DEV_PACKAGES, "test": TEST_PACKAGES}  # each split's default
TEST_FOLDERS = {"test", "tests", "testing"}


@dataclass
class Pair:
    query: str
    document: str
    package: str


def _signature(node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    if isinstance(node, ast.ClassDef):
        return f"class {node.name}"
    args = ast.unparse(node.args) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else ""
    return f"def {node.name}({args})"


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# Bumped whenever a rule that shapes the pairs changes: the demo rebuilds a dataset made by
# other rules (manifest.json's "rules") instead of reusing it.
RULES = 3
# A sentence ends at . ! or ? (and any closing quotes or brackets) before whitespace and a
# capital, a quote, a bracket or a backtick, unless the word is an abbreviation ("e.g. `x`").
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s+[A-Z`'\"(\[])")
_ABBREVIATIONS = {"e.g", "i.e", "vs", "cf", "approx", "resp", "etc"}
# Where a docstring's structure begins: a reST directive or field (".. note::", ":param x:"),
# a doctest, a Google-style section header ("Args:", "Keyword Arguments:") or argument
# ("mask (`Tensor`, *optional*):"), a numpydoc section's underline.
_STRUCTURE = re.compile(
    r"\s*(?:\.\.\s|>>>|:(?:param|parameter|arg|argument|key|keyword|type|raises?|returns?|rtype|var|ivar|cvar)\b"
    r"[^:]*:|\w+(?: \w+)?:\s*$|\w+ \(.*\):(?:\s|$))"
)
_UNDERLINE = re.compile(r"\s*[-=~^]{3,}\s*$")
MAX_SUMMARY_WORDS = 64
# A first line that is a call signature ("hann_window(window_length, *, dtype=None) -> Tensor"),
# and the "--" line that ends a C function's text signature (numpy's ufuncs).
# Only a type may follow "->" (prose after a signature keeps the line: "D.popitem() -> (k, v),
# remove and return ..."), and nothing but "->" may follow the parentheses.
_SIGNATURE_LINE = re.compile(r"\s*[\w.]+\((?:[^()]|\([^()]*\))*\)\s*(?:->\s*[\w.\[\]()|]+(?:,\s*[\w.\[\]()|]+)*)?\s*")
_SIGNATURE_END = re.compile(r"\s*--\s*")
# Heads a summary may open with that are not its words: a note's title ("Note [DDPOptimizer]",
# "[Note: Inductor bucketize op]"), an attribute's type ("(c_intp*self.ndim): ...",
# "{None, "no_cache"}: ..."), a stray opening quote.
_HEAD = re.compile(r"^(?:Note\s*\[[A-Za-z][^\]]*\]|\[Note\b[^\]]*\]|\([^)]*\):|\{[^}]*\}:|[\"']\s)\s*")


def _structural(lines: list[str], i: int) -> bool:
    """Whether ``lines[i]`` begins the docstring's structure (or is a section's underline)."""
    underlined = i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1]) is not None
    return underlined or _STRUCTURE.match(lines[i]) is not None or _UNDERLINE.match(lines[i]) is not None


def _sentence_end(text: str) -> int:
    for m in _SENTENCE_END.finditer(text):
        word = text[: m.start()].rsplit(None, 1)[-1].lower() if text[: m.start()].strip() else ""
        if word.lstrip("([{\"'`") not in _ABBREVIATIONS:  # "(e.g. `x`)" goes on
            return m.end()
    return len(text)


def split_summary(doc: str, name: str = "") -> tuple[str, str] | None:
    """(summary, the rest) of a docstring: the summary is the first sentence of its first
    paragraph, however many lines it wraps over (numpydoc and Google style wrap it; taking the
    first physical line cut 194 of numpy's 1,024 queries mid-sentence and opened their documents
    with the rest of the sentence), and ends where the docstring's structure begins (a section
    header, a directive, a doctest). A first paragraph that is just ``name``'s signature
    (``chararray(shape, ...)``) gives way to the next. None where the docstring opens with its
    structure, or no summary of at most ``MAX_SUMMARY_WORDS`` words is found."""
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", doc.strip()) if p.strip()]
    if name and paragraphs and re.fullmatch(rf"{re.escape(name)}\s*\(.*\)\s*(?:->.*)?", _clean(paragraphs[0])):
        paragraphs = paragraphs[1:]
    if not paragraphs:
        return None
    lines = paragraphs[0].splitlines()
    if lines and _SIGNATURE_LINE.fullmatch(lines[0]):  # a signature atop the paragraph's words
        lines = lines[2:] if len(lines) > 1 and _SIGNATURE_END.fullmatch(lines[1]) else lines[1:]
        if not lines:
            return split_summary("\n\n".join(paragraphs[1:])) if len(paragraphs) > 1 else None
    cut = next((i for i in range(len(lines)) if _structural(lines, i)), len(lines))
    if cut == 0:
        return None
    first = _HEAD.sub("", _clean(" ".join(lines[:cut])), count=1)
    end = _sentence_end(first)
    # reST's literal-block marker: "text::" reads "text:", a lone "::" nothing.
    summary = re.sub(r"::$", ":", re.sub(r"(?:^|\s+)::$", "", first[:end]))
    if len(summary.split()) > MAX_SUMMARY_WORDS or not summary:
        return None
    return summary, _clean(" ".join([first[end:], *lines[cut:], *paragraphs[1:]]))


def package_pairs(package: str, max_files: int = 3000, min_body_words: int = 8, limit: int | None = None) -> list[Pair]:
    """``package``'s public documented functions and classes as (summary, signature and body)
    pairs, in file order; ``limit``: the first that many (the files after them are not parsed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    out: list[Pair] = []
    for path in sorted(root.rglob("*.py"))[:max_files]:
        # A package's own tests (numpy/tests, pandas/tests/..., sklearn/*/tests) are not its API.
        if TEST_FOLDERS & set(path.parts) or path.name.startswith("test_") or path.name == "conftest.py":
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            split = split_summary(doc, node.name)
            if split is None:
                continue
            summary, body = split
            if len(summary.split()) < 4 or len(body.split()) < min_body_words:
                continue
            out.append(Pair(summary, _clean(f"{_signature(node)}: {body}")[:2000], package))
            if limit is not None and len(out) >= limit:
                return out
    return out


def scan_packages(packages: tuple[str, ...], workers: int | None = None) -> dict[str, list[Pair]]:
    """Each package's pairs, the packages parsed in parallel (``ast`` parsing is CPU-bound
    Python; the demo's eight packages of then took ~2 minutes in one process on 2 cores). ``workers``:
    at most this many at once (default: the CPUs this process may run on, at most one per
    package; local processes, so this machine's CPUs, not the Ray cluster's).

    Each package is parsed by a fresh interpreter, never by a fork: a forked Ray driver slowed
    its whole cluster ~2x (measured in the demo's test), and spawn would re-import the caller's
    main script. The child runs isolated (``-I``: no current directory or PYTHONPATH ahead of the
    installed packages) and finds this raytrieve after them; its rows come back in a file."""
    if not workers:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(len(packages), usable)
    if workers <= 1:
        return {p: package_pairs(p) for p in packages}
    root = str(Path(__file__).resolve().parents[2])  # where this raytrieve is imported from
    code = "import sys; sys.path.append(sys.argv[1]); from raytrieve.data.pydocs import _write_pairs; _write_pairs()"

    def scan(package: str) -> list[Pair]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "pairs.json"
            done = subprocess.run(
                [sys.executable, "-I", "-c", code, root, package, str(out)],
                capture_output=True,
                check=False,
                timeout=1800,
            )
            if done.returncode != 0 or not out.exists():
                tail = done.stderr.decode(errors="replace")[-2000:]
                raise RuntimeError(f"parsing {package}'s docstrings failed (exit {done.returncode}): {tail}")
            return [Pair(*row) for row in json.loads(out.read_text(encoding="utf-8"))]

    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(packages, pool.map(scan, packages), strict=True))


def _write_pairs() -> None:
    """The child of ``scan_packages``: argv = [root, package, output file]."""
    rows = [[p.query, p.document, p.package] for p in package_pairs(sys.argv[2])]
    Path(sys.argv[3]).write_text(json.dumps(rows), encoding="utf-8")


def deduplicate(pairs: list[Pair]) -> list[Pair]:
    seen_q: set[str] = set()
    seen_d: set[str] = set()
    out = []
    for p in pairs:
        q, d = p.query.lower(), p.document.lower()
        if q in seen_q or d in seen_d:
            continue
        seen_q.add(q)
        seen_d.add(d)
        out.append(p)
    return out


def _unseen(pairs: list[Pair], seen: list[Pair]) -> list[Pair]:
    queries, documents = {p.query.lower() for p in seen}, {p.document.lower() for p in seen}
    return [p for p in pairs if p.query.lower() not in queries and p.document.lower() not in documents]


def build(
    out_dir: str | Path,
    train_packages=TRAIN_PACKAGES,
    test_packages=TEST_PACKAGES,
    dev_packages=DEV_PACKAGES,
    max_per_package: int | None = 4000,
    option: str = "--out",
) -> dict:
    """Write train.parquet, dev.parquet, test.parquet and manifest.json into ``out_dir``
    (atomically; an earlier build there is replaced, a folder holding anything else is refused,
    naming ``option``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytrieve._io import atomic_directory, check_replaceable
    from raytrieve.errors import DataError

    if max_per_package is not None and max_per_package < 1:
        raise DataError(f"--max-per-package must be at least 1, got {max_per_package}")
    check_replaceable(out_dir, "manifest.json", option)

    splits: dict[str, list[Pair]] = {}
    versions = {}
    by_split = {"train": tuple(train_packages), "dev": tuple(dev_packages), "test": tuple(test_packages)}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        if both := sorted(set(by_split[a]) & set(by_split[b])):
            raise DataError(f"{both} named as both {a} and {b} packages; a package belongs to one split")
    for split, packages in by_split.items():
        if missing := [p for p in packages if importlib.util.find_spec(p) is None]:
            raise DataError(
                f"{split} package(s) {missing} not installed here; install them or name others "
                f"(build-pydocs --{split}-packages A,B)"
            )
    scanned = scan_packages(tuple(dict.fromkeys(p for packages in by_split.values() for p in packages)))
    for split, packages in by_split.items():
        pairs: list[Pair] = []
        for package in packages:
            found = scanned[package][:max_per_package]
            if found:
                versions[package] = _version(package)
            pairs += found
        splits[split] = deduplicate(pairs)
    # A query or document seen in another split would leak: test drops what training saw, dev
    # what training or test saw (pandas copies some of numpy's docstrings).
    splits["test"] = _unseen(splits["test"], splits["train"])
    splits["dev"] = _unseen(splits["dev"], splits["train"] + splits["test"])
    manifest = {
        "rules": RULES,
        "packages": versions,
        "train_packages": list(train_packages),
        "dev_packages": list(dev_packages),
        "test_packages": list(test_packages),
        "rows": {k: len(splits[k]) for k in SPLITS},
        "columns": ["id", "query", "document", "package"],
        "files": [*(f"{k}.parquet" for k in SPLITS), "train_labeled.parquet", "train_listwise.parquet"],
    }
    with atomic_directory(Path(out_dir)) as tmp:
        for split in SPLITS:
            pairs = splits[split]
            # A stable id per pair (= per document: documents are deduplicated), so the split
            # doubles as a corpus for the encoding job and as qrels for evaluation.
            table = pa.table(
                {
                    "id": [f"{split}-{i:06d}" for i in range(len(pairs))],
                    "query": [p.query for p in pairs],
                    "document": [p.document for p in pairs],
                    "package": [p.package for p in pairs],
                }
            )
            pq.write_table(table, tmp / f"{split}.parquet")
        # For cross-encoders: each training query with its document (1) and random others (0),
        # as labeled pairs and as one ranked list per query.
        rng = random.Random(0)
        train = splits["train"]
        q, d, y, lists, list_labels = [], [], [], [], []
        for i, p in enumerate(train):
            others = [train[j].document for j in rng.sample(range(len(train)), 4) if j != i][:3]
            q += [p.query, p.query]
            d += [p.document, others[0]]
            y += [1.0, 0.0]
            lists.append([p.document, *others])
            list_labels.append([1.0] + [0.0] * len(others))
        pq.write_table(pa.table({"query": q, "document": d, "label": y}), tmp / "train_labeled.parquet")
        pq.write_table(
            pa.table({"query": [p.query for p in train], "documents": lists, "labels": list_labels}),
            tmp / "train_listwise.parquet",
        )
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _version(package: str) -> str:
    """The installed version of the distribution that provides the import name ``package``
    ("sklearn" is scikit-learn's), or "unknown"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        pass
    for name in importlib.metadata.packages_distributions().get(package, ()):  # a scan of every one
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"
