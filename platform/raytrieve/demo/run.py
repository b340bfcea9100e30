"""``make demo``: the whole platform on real text, on one machine.

1. data: the pydocs dataset (docstrings of installed packages, split by package) and samples;
2. the pretrained models, in process: held-out pairs of the train packages ("dev") and Lee;
3. the pretrained models through the platform: the Ray Data encoding job encodes the test
   corpus, indices are built, Serve answers every test query over HTTP at four stages
   (dense, sparse, hybrid RRF, hybrid + cross-encoder rerank);
4. fine-tuning of the dense and the sparse model with Ray Train, tracked and registered in
   MLflow;
5. the fine-tuned models, again in process (dev, Lee) and through the platform, Serve loading
   them from the MLflow registry (models:/NAME/VERSION);
6. the report: a table (stage x metric, before and after), markdown and a PNG chart.

Each step records its result under <out_dir>/stages/ with a key of everything it depends
on; a second run reuses every step whose key is unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytrieve.demo import sample as sampling
from raytrieve.demo import scoring
from raytrieve.demo.config import DemoConfig, FineTuneConfig
from raytrieve.errors import ConfigError

EXPERIMENT = "raytrieve-demo"
# Part of every step's key: bump it when a step's recorded result changes shape, so an older
# out/demo is recomputed instead of misread.
STAGE_FORMAT = 2


class Progress:
    """Timestamped progress lines, plus a heartbeat while a long step is quiet."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log, self.t0 = log, time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = int(time.monotonic() - self.t0)
        self.log(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}")

    @contextlib.contextmanager
    def heartbeat(
        self, what: str, status: Callable[[], str | None] | None = None, every_s: float = 20.0
    ) -> Iterator[None]:
        stop = threading.Event()
        started = time.monotonic()

        def beat() -> None:
            while not stop.wait(every_s):
                try:
                    detail = status() if status else None
                except Exception:  # a status probe must never break the step it watches
                    detail = None
                self(f"  ... {what}: {time.monotonic() - started:.0f}s" + (f", {detail}" if detail else ""))

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


class StageStore:
    """<out>/stages/<name>.json = {"key": ..., "result": ...}, written atomically when a step ends."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.reused: list[str] = []  # steps taken from an earlier run, named in the report

    @staticmethod
    def digest(key: Any) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def get(self, name: str, key: Any, still_valid: Callable[[Any], bool] = lambda _: True) -> Any | None:
        """The recorded result when its key matches (and ``still_valid`` accepts it), else None."""
        path = self.folder / f"{name}.json"
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if record.get("key") != self.digest(key) or not still_valid(record["result"]):
            return None
        self.reused.append(name)
        return record["result"]

    def put(self, name: str, key: Any, result: Any) -> Any:
        from raytrieve._io import write_json

        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / f"{name}.json", {"key": self.digest(key), "result": result})
        return result


@dataclass
class DemoResult:
    report: dict[str, Any]
    markdown_path: Path
    chart_path: Path
    seconds: float


# -- in-process evaluation (dev pairs of the train packages; Lee) --------------------------------


def evaluate_in_process(
    kind: str, model: str, split: sampling.Split, recall_k: int, max_seq_length: int, lee: bool
) -> dict[str, Any]:
    from raytrieve.encoders import load_encoder
    from raytrieve.evaluation import InformationRetrievalEvaluator, SparseInformationRetrievalEvaluator

    encoder = load_encoder(kind, model, device="cpu", max_seq_length=max_seq_length)
    cls = InformationRetrievalEvaluator if kind == "dense" else SparseInformationRetrievalEvaluator
    evaluator = cls(
        split.queries,
        split.corpus,
        {q: {d} for q, d in split.qrels.items()},
        ndcg_at_k=(10,),
        mrr_at_k=(10,),
        accuracy_at_k=(1,),
        precision_recall_at_k=(recall_k,),
        map_at_k=(recall_k,),
        write_csv=False,
    )
    hits = next(iter(evaluator.retrieve(encoder).values()))
    rankings = {qid: [evaluator.corpus_ids[i] for _, i in ranked] for qid, ranked in zip(evaluator.query_ids, hits)}
    out: dict[str, Any] = {"per_query": scoring.per_query(rankings, split.qrels, recall_k)}
    if lee:
        from raytrieve.evaluation.lee import lee_evaluator

        scores = lee_evaluator(write_csv=False)(encoder)
        out["lee_spearman"] = next(v for k, v in scores.items() if "spearman" in k)
    return out


# -- the platform path: encoding job, indices, Serve over HTTP ----------------------------------


def _check_port_free(port: int) -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise ConfigError(f"serving.port: 127.0.0.1:{port} is already in use; pass serving.port=<a free port>")


def encode_and_index(cfg: DemoConfig, samples: sampling.Samples, dense: str, sparse: str, folder: Path) -> dict:
    from raytrieve.config import from_dict
    from raytrieve.index.build import build_indices
    from raytrieve.inference.config import EncodeConfig
    from raytrieve.inference.encode import run_encode

    encode = from_dict(
        EncodeConfig,
        {
            "corpus": {"path": str(samples.test_corpus_path), "id_column": "id", "text_column": "document"},
            "output_dir": str(folder / "vectors"),
            "side": "document",
            "rows_per_shard": 500,
            "dense": {"model": dense, "max_seq_length": cfg.models.max_seq_length},
            "sparse": {"model": sparse, "max_seq_length": cfg.models.max_seq_length},
            "compute": {
                "tokenize_actors": 1,
                "encode_actors": 1,
                "cpus_per_encode_actor": 1.0,
                "torch_threads": cfg.serving.torch_threads,
            },
        },
        where="demo encode",
    )
    result = run_encode(encode, where="demo encode")
    built = build_indices(folder / "vectors", folder / "index")
    return {
        "rows": result.rows,
        "rows_per_s": round(result.rows_per_s, 1),
        "seconds": round(result.seconds, 1),
        "index": str(folder / "index"),
        "built": built,
    }


def serve_and_query(
    cfg: DemoConfig,
    samples: sampling.Samples,
    dense: str,
    sparse: str,
    index: str,
    progress: Progress,
    serve_running: bool = False,
) -> dict[str, Any]:
    """Deploy the demo's app, query it over HTTP, delete the app. ``serve_running``: this run
    already started Serve (its proxy holds the port); the app is deployed on it."""
    from ray import serve

    from raytrieve.config import from_dict
    from raytrieve.demo.client import run_queries
    from raytrieve.serve.app import start
    from raytrieve.serve.client import wait_healthy
    from raytrieve.serve.config import ServeConfig

    s, m = cfg.serving, cfg.models
    replica = {"max_seq_length": m.max_seq_length, "num_cpus": 0.5, "torch_threads": s.torch_threads}
    serve_cfg = from_dict(
        ServeConfig,
        {
            "dense": {"model": dense, "name": "dense", **replica},
            "sparse": {"model": sparse, "name": "sparse", **replica},
            "reranker": {"model": m.reranker, "name": "reranker", **replica, "max_batch_tokens": 16384},
            "index": index,
            "port": s.port,
            "app_name": "raytrieve-demo",
            "mlflow_tracking_uri": cfg.tracking_uri(),
            "limits": {
                "max_top_k": max(100, s.recall),
                "max_rerank_depth": max(200, s.rerank_depth),
                "max_queued_requests": 256,
            },
        },
        where="demo serve",
    )
    if not serve_running:
        _check_port_free(s.port)
    base = start(serve_cfg, where="demo serve", ray_address=None)
    try:
        wait_healthy(base)
        progress(f"  Serve is up at {base}; sending {len(samples.test.queries)} test queries to /search over HTTP")
        answers = run_queries(
            base, samples.test.queries, s.recall, s.rerank_depth, s.clients, progress=lambda line: progress(f"  {line}")
        )
    finally:
        # Frees the replicas' CPUs for training; Serve's controller and proxy stay up for the
        # next phase (restarting them cost about 10 s) and stop at the end of the run.
        serve.delete(serve_cfg.app_name)
    return {
        "per_stage": {
            mode: scoring.per_query(r, samples.test.qrels, s.recall) for mode, r in answers["rankings"].items()
        },
        "timings_p50_ms": answers["timings_p50_ms"],
        "url": base,
    }


# -- fine-tuning --------------------------------------------------------------------------------


def train_config(cfg: DemoConfig, kind: str, ft: FineTuneConfig, train_path: Path) -> Any:
    from raytrieve.config import from_dict
    from raytrieve.train.config import TrainConfig, check_values

    if kind == "dense":
        model, loss = cfg.models.dense, {"name": "MultipleNegativesRankingLoss", "args": {"scale": 20.0}}
    else:
        model = cfg.models.sparse
        loss = {
            "name": "SpladeLoss",
            "args": {"document_regularizer_weight": 3e-5, "query_regularizer_weight": 5e-5},
            "inner": {"name": "SparseMultipleNegativesRankingLoss"},
        }
    data = {
        "model": {"name_or_path": model, "kind": kind, "max_seq_length": cfg.models.max_seq_length},
        "datasets": [{"name": "pydocs", "path": str(train_path), "columns": ["query", "document"], "loss": loss}],
        "output_dir": str(cfg.out / "models" / kind),
        "training": {"batch_size": ft.batch_size, "epochs": ft.epochs, "max_steps": ft.max_steps, "seed": 42},
        "optimizer": {"learning_rate": ft.learning_rate},
        "schedule": {"name": "linear", "warmup_ratio": 0.1},
        "checkpoint": {"keep": 1},
        "scaling": {"num_workers": 1, "torch_threads": cfg.serving.torch_threads},
        "mlflow": {
            "tracking_uri": cfg.tracking_uri(),
            "experiment": EXPERIMENT,
            "run_name": f"demo-{kind}",
            "register_model_as": ft.register_as,
            "tags": {"raytrieve.demo": "true"},
        },
    }
    return check_values(from_dict(TrainConfig, data, where=f"demo {kind}_training"), where=f"demo {kind}_training")


def _training_status(uri: str, kind: str) -> str | None:
    from raytrieve.tracking import mlflow_run

    c = mlflow_run.client(uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None
    runs = c.search_runs(
        [exp.experiment_id],
        filter_string=f"attributes.run_name = 'demo-{kind}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    loss = runs[0].data.metrics.get("loss")
    steps = c.get_metric_history(runs[0].info.run_id, "loss")
    return f"step {steps[-1].step}, loss {loss:.4f}" if steps and loss is not None else None


def fine_tune(cfg: DemoConfig, kind: str, ft: FineTuneConfig, samples: sampling.Samples, progress: Progress) -> dict:
    import yaml

    from raytrieve.train.checkpoint import checkpoint_dir
    from raytrieve.train.run import run_training

    tc = train_config(cfg, kind, ft, samples.train_path)
    # A changed config must not resume from (or be refused by) an older run's checkpoints.
    for stale in (Path(tc.output_dir), checkpoint_dir(tc)):
        shutil.rmtree(stale, ignore_errors=True)
    saved = cfg.out / "configs" / f"train_{kind}.yaml"
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(
        f"# What the demo trained; rerun with: raytrieve train --config {saved}\n"
        + yaml.safe_dump(json.loads(json.dumps(tc.model_dump())), sort_keys=False)
    )
    with progress.heartbeat(f"training {kind}", lambda: _training_status(cfg.tracking_uri(), kind)):
        result = run_training(tc, where=f"demo {kind}_training", ray_address=None)
    return {
        "model_dir": result.output_dir,
        "run_id": result.run_id,
        "steps": result.steps,
        "uri": f"models:/{ft.register_as}/{result.model_version}",
        "config": str(saved),
    }


# -- the whole demo -----------------------------------------------------------------------------


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print, ray_address: str | None = "local") -> DemoResult:
    """Run (or reuse) every step. ``ray_address``: "local" starts an embedded Ray unless this
    process already has one; None joins the cluster this runs on."""
    from raytrieve.tracking import mlflow_run

    cfg.check("demo")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The demo prints its own progress; MLflow's per-file bars would bury it.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # This process resolves models:/ URIs through the demo's store (Ray workers get resolved
    # paths; Serve replicas get the URI in their runtime_env).
    with mlflow_run.environment(cfg.tracking_uri()):
        return _run(cfg, log, ray_address)


def _run(cfg: DemoConfig, log: Callable[[str], None], ray_address: str | None) -> DemoResult:
    from raytrieve.demo import report

    started = time.monotonic()
    progress = Progress(log)
    out = cfg.out
    store = StageStore(out / "stages")
    recall_k = cfg.serving.recall

    progress("1/6 data")
    manifest = sampling.ensure_pydocs(Path(cfg.pydocs_dir), lambda line: progress(f"  {line}"))
    samples = sampling.prepare(cfg, manifest, out / "data")
    progress(
        f"  samples: {cfg.sample.train_pairs} train pairs; dev {len(samples.dev.queries)} queries over "
        f"{len(samples.dev.corpus)} documents; test {len(samples.test.queries)} queries over "
        f"{len(samples.test.corpus)} documents"
    )
    m = cfg.models
    base_key = {"format": STAGE_FORMAT, "samples": samples.key, "max_seq_length": m.max_seq_length, "recall": recall_k}

    def in_process(phase: str, dense: str, sparse: str, identity: Any) -> dict:
        key = {**base_key, "models": identity}
        cached = store.get(f"dev-{phase}", key)
        if cached is not None:
            progress("  reused")
            return cached
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        result = {
            "dense": evaluate_in_process("dense", dense, samples.dev, recall_k, m.max_seq_length, lee=True),
            "sparse": evaluate_in_process("sparse", sparse, samples.dev, recall_k, m.max_seq_length, lee=False),
        }
        return store.put(f"dev-{phase}", key, result)

    serving: list[str] = []  # phases that deployed on Serve in this run (Serve is up after the first)

    def platform(phase: str, dense: str, sparse: str, identity: Any) -> dict:
        key = {**base_key, "models": identity, "reranker": m.reranker, "serving": cfg.serving.model_dump()}
        cached = store.get(f"test-{phase}", key)
        if cached is not None:
            progress("  reused")
            return cached
        folder = out / phase
        shutil.rmtree(folder, ignore_errors=True)  # vectors of other models or samples
        progress(f"  encoding {len(samples.test.corpus)} test documents (Ray Data encoding job) and building indices")
        with progress.heartbeat("encoding"):
            encoded = encode_and_index(cfg, samples, dense, sparse, folder)
        progress(f"  encoded {encoded['rows']} documents at {encoded['rows_per_s']} rows/s; starting Serve")
        running = bool(serving)
        serving.append(phase)  # before the call: Serve is stopped at the end even if this phase fails
        served = serve_and_query(cfg, samples, dense, sparse, encoded["index"], progress, running)
        return store.put(f"test-{phase}", key, {"encode": encoded, **served})

    progress(f"2/6 pretrained {m.dense} and {m.sparse}: held-out train-package pairs and the Lee corpus (in process)")
    before_dev = in_process("pretrained", m.dense, m.sparse, [m.dense, m.sparse])

    import ray

    from raytrieve.ray_cluster import connect

    connect(ray_address, num_cpus=cfg.num_cpus if ray_address == "local" else None, log_to_driver=False)
    import ray.serve  # imported before its logger is quietened below, and stopped at the end
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    # After the imports: Ray Data and Serve set up their loggers when first imported.
    for name in ("ray.data", "ray.serve", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        progress("3/6 pretrained models through the platform: encoding job, indices, Serve, HTTP")
        before_test = platform("pretrained", m.dense, m.sparse, [m.dense, m.sparse])

        progress("4/6 fine-tuning with Ray Train, tracked in MLflow")
        tuned: dict[str, dict] = {}
        for kind, ft, base in (("dense", cfg.dense_training, m.dense), ("sparse", cfg.sparse_training, m.sparse)):
            if not ft.enabled:
                progress(f"  {kind}: fine-tuning disabled; the pretrained model stays")
                tuned[kind] = {"uri": base, "run_id": None}
                continue
            key = {**base_key, "kind": kind, "model": base, "fine_tune": ft.model_dump(), "uri": cfg.tracking_uri()}
            # A recorded run whose registry version is gone (a wiped store) is trained again.
            cached = store.get(f"train-{kind}", key, lambda r: _registered(cfg.tracking_uri(), r["uri"]))
            if cached is not None:
                progress(f"  {kind}: reused {cached['uri']} (run {cached['run_id']})")
                tuned[kind] = cached
                continue
            progress(f"  {kind}: {base} on {cfg.sample.train_pairs} pairs, batch {ft.batch_size}, {ft.epochs} epoch(s)")
            tuned[kind] = store.put(f"train-{kind}", key, fine_tune(cfg, kind, ft, samples, progress))
            progress(f"  {kind}: registered {tuned[kind]['uri']} ({tuned[kind]['steps']} steps)")
        identity = [
            tuned["dense"]["uri"],
            tuned["dense"].get("run_id"),
            tuned["sparse"]["uri"],
            tuned["sparse"].get("run_id"),
        ]

        progress(
            "5/6 fine-tuned models: held-out train-package pairs and Lee (in process), then through the platform "
            "with Serve loading them from the MLflow registry"
        )
        after_dev = in_process("fine-tuned", tuned["dense"]["uri"], tuned["sparse"]["uri"], identity)
        after_test = platform("fine-tuned", tuned["dense"]["uri"], tuned["sparse"]["uri"], identity)

    finally:
        if serving:  # this stops every Serve app on the cluster: the demo is meant for its own embedded Ray
            ray.serve.shutdown()

    progress("6/6 report")
    rep = report.build(
        cfg,
        samples,
        before_dev,
        after_dev,
        before_test,
        after_test,
        tuned,
        seconds=time.monotonic() - started,
        reused=store.reused,
    )
    md, png = report.write(rep, out)
    for line in report.console(rep):
        log(line)
    log(f"\nmarkdown: {md}\nchart:    {png}")
    uri = cfg.tracking_uri()
    log(
        f"MLflow runs: {uri} (experiment {EXPERIMENT!r}); open the UI with:\n"
        f"  MLFLOW_ALLOW_FILE_STORE=true .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000"
    )
    return DemoResult(rep, md, png, time.monotonic() - started)


def _registered(uri: str, model_uri: str) -> bool:
    """Whether a cached training step's registry version still exists (the store may be gone)."""
    from raytrieve.tracking import mlflow_run

    try:
        name, version = model_uri.removeprefix("models:/").split("/")
        mlflow_run.client(uri).get_model_version(name, version)
        return True
    except Exception:
        return False
