"""Peak resident memory and time of `raytrieve index build` over an encoding job's folder, and
of a Serve replica's documents opened from the index (the texts /search returns), at two corpus
sizes: the growth per million rows says whether the build or a replica holds the corpus.

    .venv/bin/python benchmarks/index_memory.py                          # 100,000 and 1,000,000 rows
    .venv/bin/python benchmarks/index_memory.py --before /tmp/before     # and a checkout before, interleaved

The job's folder is written here without Ray or a model, as the encoding job writes it:
shards of 10,000 rows (its default), dense float32 vectors of 384 dimensions (all-MiniLM's),
sparse vectors of 64 terms a row over a 30,522-term vocabulary (a SPLADE document's order of
size), and its corpus (a parquet file of ids and texts of about 300 characters, which the
build reads for documents/). Each build is a fresh process. Its figures: peak anonymous
memory (RssAnon, sampled every 20 ms: what the build holds and the kernel cannot reclaim),
peak file-backed resident pages (RssFile: memory-mapped files, written back and dropped under
pressure) and ru_maxrss (both). Then a fresh process opens the index as a Serve replica does
(``serve.deployments.Documents``), runs 100 dense and 100 sparse searches with their texts
and looks up 1,000 ids: its anonymous memory after opening, less that after its imports, is
what a replica holds for the corpus. With ``--before`` the two checkouts alternate at each
size. Prints one JSON line per checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIM, TERMS, VOCAB, SHARD = 384, 64, 30522, 10_000

_CHILD = r"""
import json, resource, sys, threading, time
from raytrieve.index.build import IndexOptions, build_indices

peak = {"RssAnon": 0, "RssFile": 0}
def sample():  # anonymous memory is what the build holds; file pages (memory maps) the kernel can write back
    while True:
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in peak:
                peak[key] = max(peak[key], int(value.split()[0]))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
summary = build_indices(sys.argv[1], sys.argv[2], IndexOptions(quantize=sys.argv[3] if sys.argv[3] != "none" else None))
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "anon_mb": peak["RssAnon"] / 1024, "file_mb": peak["RssFile"] / 1024,
                  "seconds": round(time.perf_counter() - t, 1), "rows": summary["rows"]}))
"""


_SERVE = r"""
import json, sys, time
import numpy as np
from raytrieve.serve.deployments import Documents

def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:")) / 1024
before = anon()
t = time.perf_counter()
docs = Documents([sys.argv[1]])
opened = time.perf_counter() - t
rng = np.random.default_rng(1)
ix = docs.indices[sys.argv[1]]
n = len(ix.dense)
t = time.perf_counter()
for q in rng.standard_normal((100, ix.dense.dim), dtype=np.float32):
    hits, texts = docs.search_with_texts(sys.argv[1], "dense", q / np.linalg.norm(q), 100, 10)
    assert len(texts) == 10 and all(texts.values())
for terms in rng.integers(0, 30522, size=(100, 16)):
    docs.search_with_texts(sys.argv[1], "sparse", (terms, np.ones(16, np.float32)), 100, 10)
searched = time.perf_counter() - t
t = time.perf_counter()
looked = docs.lookup([f"doc-{i}" for i in rng.integers(0, n, size=1000)])
assert all(looked)
print(json.dumps({"serve_anon_mb": anon() - before, "open_seconds": round(opened, 2),
                  "search_ms": round(searched * 1000 / 200, 2),
                  "lookup_ms": round((time.perf_counter() - t) * 1000 / 1000, 3)}))
"""


def _text(i: int, words: list[str]) -> str:
    return f"document {i}: " + " ".join(words[(i * 7 + k * 13) % len(words)] for k in range(40))


def write_job(n: int, out: Path) -> Path:
    """An encoding job's finished folder of ``n`` rows (random unit vectors, random terms) and its
    corpus (``<out>.parquet``, the texts the job's text hashes name)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytrieve.inference import shards
    from raytrieve.hashing import text_hashes

    if (out / shards.MANIFEST).exists():
        return out
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=int(k))) for k in rng.integers(2, 11, 997)]
    corpus = out.with_suffix(".parquet")
    writer = pq.ParquetWriter(corpus, pa.schema([("id", pa.string()), ("text", pa.string())]))
    store = shards.OutputStore(str(out))
    entries = []
    for number, start in enumerate(range(0, n, SHARD)):
        rows = min(SHARD, n - start)
        ids = [f"doc-{i}" for i in range(start, start + rows)]
        texts = [_text(i, words) for i in range(start, start + rows)]
        writer.write_table(pa.table({"id": ids, "text": texts}), row_group_size=SHARD)
        dense = rng.standard_normal((rows, DIM), dtype=np.float32)
        dense /= np.linalg.norm(dense, axis=1, keepdims=True)
        offsets = np.arange(rows + 1, dtype=np.int64) * TERMS
        indices = np.sort(rng.integers(0, VOCAB, size=(rows, TERMS)), axis=1).reshape(-1)
        values = rng.random(rows * TERMS, dtype=np.float32) + 0.01
        table = shards.shard_table(ids, dense, (offsets, indices, values), text_hashes(texts))
        sidecar = shards.write_shard(store, number, table, {"input_rows": rows, "bad_rows": []})
        entries.append({"file": sidecar["file"], "rows": rows, "input_rows": rows, "sha256": sidecar["sha256"]})
    writer.close()
    model = {"model": "m", "model_path": "/m", "prompt": None, "max_seq_length": 256}
    store.write_json(shards.JOB, {"config": {"rows_per_shard": SHARD}})
    store.write_json(shards.MANIFEST, {
        "format": "raytrieve-vectors", "version": 2, "fingerprint": "bench",
        "corpus": {"path": str(corpus), "format": "parquet", "input_rows": n, "bad_rows": 0, "id_column": "id", "text_column": "text"},
        "rows": n, "side": "document",
        "dense": {**model, "similarity": "cosine", "dim": DIM, "precision": "float32", "truncate_dim": None,
                  "normalize": True, "ranges": None},
        "sparse": {**model, "similarity": "dot", "vocab_size": VOCAB, "max_active_dims": None},
        "shards": entries,
    })
    return out


def _child(code: Path, script: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code / "platform")}
    run = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, cwd=code)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def build(code: Path, job: Path, out: Path, quantize: str) -> dict:
    """The build's figures, then those of a replica opening what it built."""
    return {**_child(code, _CHILD, str(job), str(out), quantize), **_child(code, _SERVE, str(out))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs=2, default=[100_000, 1_000_000])
    parser.add_argument("--before", type=Path, help="a checkout to measure in turn with this one")
    parser.add_argument("--quantize", default="int8", choices=["none", "int8", "binary"])
    args = parser.parse_args()
    codes = [ROOT] + ([args.before] if args.before else [])
    results: dict[Path, dict[int, dict]] = {code: {} for code in codes}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for n in args.rows:
            job = write_job(n, Path(tmp) / f"job-{n}")
            for code in codes:
                results[code][n] = build(code, job, Path(tmp) / f"index-{n}", args.quantize)
    for code, runs in results.items():
        (a, ra), (b, rb) = sorted(runs.items())
        print(json.dumps({
            "code": str(code), "quantize": args.quantize,
            "peak_rss_mb": {n: round(r["peak_mb"], 1) for n, r in runs.items()},
            "peak_anon_mb": {n: round(r["anon_mb"], 1) for n, r in runs.items()},
            "peak_file_mb": {n: round(r["file_mb"], 1) for n, r in runs.items()},
            "seconds": {n: r["seconds"] for n, r in runs.items()},
            "anon_growth_mb_per_1m_rows": round((rb["anon_mb"] - ra["anon_mb"]) / ((b - a) / 1e6), 1),
            "serve_anon_mb": {n: round(r["serve_anon_mb"], 1) for n, r in runs.items()},
            "serve_open_seconds": {n: r["open_seconds"] for n, r in runs.items()},
            "serve_search_ms": {n: r["search_ms"] for n, r in runs.items()},
            "serve_lookup_ms": {n: r["lookup_ms"] for n, r in runs.items()},
        }))


if __name__ == "__main__":
    main()
