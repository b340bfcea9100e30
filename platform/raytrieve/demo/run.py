"""``make demo``: the whole platform on real text, on one machine.

1. data: the pydocs dataset (docstrings of installed packages, split by package), or the
   user's BEIR folder (``beir:``), and samples of it (demo/sample.py);
2. the pretrained models, in process: the dev split (pydocs: pairs of the dev packages, never
   trained on nor tested) and Lee;
3. the pretrained models through the platform: the Ray Data encoding job encodes the test
   corpus, indices are built, Serve answers every test query over HTTP at four stages
   (dense, sparse, hybrid RRF, hybrid + cross-encoder rerank; /search fitted on dev, and the
   same with the dev's best rerank forced on);
4. fine-tuning of the dense and the sparse model with Ray Train, tracked and registered in
   MLflow;
5. the fine-tuned models, again in process (dev, Lee) and through the platform, Serve loading
   them from the MLflow registry (models:/NAME/VERSION);
6. the report: a table (stage x metric, before and after), markdown and a PNG chart.

Each step records its result under <out_dir>/stages/ with a key of everything it depends
on; a second run reuses every step whose key is unchanged.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytrieve.demo import sample as sampling
from raytrieve.demo.config import DemoConfig, FineTuneConfig
from raytrieve.demo.evaluate import encode_and_index, evaluate_in_process, serve_and_query
from raytrieve.demo.fine_tune import fine_tune, mine_negatives, registered
from raytrieve.demo.fusion_fit import fit_on_dev, rerank_request, scoring_key
from raytrieve.demo.phase_configs import (
    EXPERIMENT,
    check_all,
    encode_config,
    serve_config,
    served_reranker,
    train_config,
)
from raytrieve.demo.progress import Progress, StageStore

# Part of every step's key: bump it when a step's recorded result changes shape, so an older
# out/demo is recomputed instead of misread.
STAGE_FORMAT = 4


@dataclass
class DemoResult:
    report: dict[str, Any]
    markdown_path: Path
    chart_path: Path
    seconds: float


# -- the whole demo -----------------------------------------------------------------------------


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print, ray_address: str | None = "local") -> DemoResult:
    """Run (or reuse) every step. ``ray_address``: "local" starts an embedded Ray unless this
    process already has one; None joins the cluster this runs on."""
    from raytrieve.tracking import mlflow_run

    cfg.check("demo")
    check_all(cfg)
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
    if cfg.beir is not None:
        b = cfg.beir
        progress(
            f"  reading {b.path} (BEIR: corpus, queries, qrels of {b.train_split}, "
            f"{b.dev_split or 'dev if there'}, {b.test_split})"
        )
        samples = sampling.prepare_beir(cfg, out / "data")
        if samples.dev_note:
            progress(f"  no dev split: {len(samples.dev.qrels)} {samples.dev_note} are the dev split")
    else:
        manifest = sampling.ensure_pydocs(Path(cfg.pydocs_dir), lambda line: progress(f"  {line}"))
        samples = sampling.prepare(cfg, manifest, out / "data")
    progress(
        f"  samples: {samples.train_pairs} train pairs; dev {len(samples.dev.queries)} queries over "
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

    def fit(phase: str, dev: dict, identity: Any, dense: str, sparse: str, reranker: str) -> dict | None:
        """/search's settings fitted on the dev split for this phase's models (None: not fitted),
        the rerank depth scored by the reranker deployment this phase serves."""
        if not cfg.fusion_fit.enabled:
            return None
        spec = served_reranker(cfg, dense, sparse, out / phase / "index", reranker)
        key = {**base_key, "models": identity, "reranker": scoring_key(spec), "fit": cfg.fusion_fit.model_dump()}
        cached = store.get(f"fit-{phase}", key)
        if cached is not None:
            progress(f"  fusion: reused {cached['label']}")
            return cached
        return store.put(f"fit-{phase}", key, fit_on_dev(cfg, samples.dev, dev, spec, progress))

    serving: list[str] = []  # phases that deployed on Serve in this run (Serve is up after the first)

    def platform(
        phase: str, dense: str, sparse: str, identity: Any, fitted: dict | None, reranker: str | None = None
    ) -> dict:
        folder = out / phase
        encode = encode_config(cfg, samples.test_corpus_path, dense, sparse, folder)
        search = fitted["setting"] if fitted else None
        served = serve_config(cfg, dense, sparse, folder / "index", search, reranker or m.reranker)
        with_rerank = rerank_request(fitted, cfg.serving.rerank_depth)
        key = {
            "fitted_rerank": with_rerank,
            **base_key,
            "models": identity,
            "reranker": reranker or m.reranker,
            "serving": cfg.serving.model_dump(),
            "encode": encode.config.model_dump(mode="json"),
            "serve": served.config.model_dump(mode="json"),
        }
        cached = store.get(f"test-{phase}", key)
        if cached is not None:
            progress("  reused")
            return cached
        shutil.rmtree(folder, ignore_errors=True)  # vectors of other models or samples
        encode.save(out / "configs" / f"encode_{phase}.yaml", "raytrieve encode")
        served.save(out / "configs" / f"serve_{phase}.yaml", "raytrieve serve")
        progress(f"  encoding {len(samples.test.corpus)} test documents (Ray Data encoding job) and building indices")
        with progress.heartbeat("encoding"):
            encoded = encode_and_index(encode, folder)
        progress(f"  encoded {encoded['rows']} documents at {encoded['rows_per_s']} rows/s; starting Serve")
        running = bool(serving)
        serving.append(phase)  # before the call: Serve (or the run's own Ray) is stopped at the end even if this fails
        answered = serve_and_query(cfg, samples, served, progress, running, with_rerank)
        return store.put(f"test-{phase}", key, {"encode": encoded, **answered})

    dev_words = (
        "the dev packages' pairs"
        if cfg.beir is None
        else (samples.dev_note or f"the {cfg.beir.dev_split or 'dev'} split")
    )
    progress(f"2/6 pretrained {m.dense} and {m.sparse}: {dev_words} and the Lee corpus (in process)")
    before_dev = in_process("pretrained", m.dense, m.sparse, [m.dense, m.sparse])
    before_fit = fit("pretrained", before_dev, [m.dense, m.sparse], m.dense, m.sparse, m.reranker)

    import ray

    from raytrieve.ray_cluster import connect

    embedded = ray_address == "local" and not ray.is_initialized()  # a Ray of this run's own
    connect(ray_address, num_cpus=cfg.num_cpus if ray_address == "local" else None, log_to_driver=False)
    import ray.serve  # imported before its logger is quietened below
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    # After the imports: Ray Data and Serve set up their loggers when first imported.
    for name in ("ray.data", "ray.serve", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        progress("3/6 pretrained models through the platform: encoding job, indices, Serve, HTTP")
        before_test = platform("pretrained", m.dense, m.sparse, [m.dense, m.sparse], before_fit)

        progress("4/6 fine-tuning with Ray Train, tracked in MLflow")

        def train(kind: str, ft: FineTuneConfig, base: str, data: Path, what: str, data_key: Any = None) -> dict:
            if not ft.enabled:
                progress(f"  {kind}: fine-tuning disabled; the pretrained model stays")
                return {"uri": base, "run_id": None}
            phase = train_config(cfg, kind, ft, data)
            key = {**base_key, "kind": kind, "train": phase.config.model_dump(mode="json"), "data": data_key}
            # A recorded run whose registry version is gone (a wiped store) is trained again.
            cached = store.get(f"train-{kind}", key, lambda r: registered(cfg.tracking_uri(), r["uri"]))
            if cached is not None:
                progress(f"  {kind}: reused {cached['uri']} (run {cached['run_id']})")
                return cached
            progress(
                f"  {kind}: {base} on {what}, batch {ft.batch_size}, {ft.epochs} epoch(s) "
                f"({phase.source} with the demo's overrides)"
            )
            saved = out / "configs" / f"train_{kind}.yaml"
            done = store.put(f"train-{kind}", key, fine_tune(kind, ft, phase, saved, progress))
            progress(f"  {kind}: registered {done['uri']} ({done['steps']} steps)")
            return done

        pairs = f"{samples.train_pairs} pairs"
        tuned: dict[str, dict] = {
            "dense": train("dense", cfg.dense_training, m.dense, samples.train_path, pairs),
            "sparse": train("sparse", cfg.sparse_training, m.sparse, samples.train_path, pairs),
        }
        if cfg.reranker_training.enabled:
            mined = mine_negatives(cfg, samples.train_path, tuned["dense"], store, progress, base_key)
            rows = f"{mined['rows']} mined (query, positive, 3 negatives) rows"
            tuned["cross"] = train("cross", cfg.reranker_training, m.reranker, Path(mined["output_path"]), rows, mined)
        else:
            tuned["cross"] = {"uri": m.reranker, "run_id": None}
        identity = [tuned[k][f] for k in ("dense", "sparse", "cross") for f in ("uri", "run_id")]

        progress(
            f"5/6 fine-tuned models: {dev_words} and Lee (in process), then through the platform "
            "with Serve loading them from the MLflow registry"
        )
        after_dev = in_process("fine-tuned", tuned["dense"]["uri"], tuned["sparse"]["uri"], identity)
        reranker = tuned["cross"]["uri"]
        after_fit = fit("fine-tuned", after_dev, identity, tuned["dense"]["uri"], tuned["sparse"]["uri"], reranker)
        after_test = platform(
            "fine-tuned", tuned["dense"]["uri"], tuned["sparse"]["uri"], identity, after_fit, reranker
        )

    finally:
        # A Ray of the run's own stops here, Serve with it: serve.shutdown() would print a raylet
        # error line at the end of a good run (the controller kills itself under its own
        # graceful_shutdown call, which Ray then reports as a failed task to retry), while
        # ray.shutdown() is quiet and frees Serve's port for a later run in this process. On a
        # Ray it joined (a test session's), only Serve is stopped.
        if embedded:
            ray.shutdown()
        elif serving:
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
        {"before": before_fit, "after": after_fit},
        seconds=time.monotonic() - started,
        reused=store.reused,
    )
    md, png = report.write(rep, out)
    for line in report.console(rep):
        log(line)
    log(f"\nmarkdown: {md}\nchart:    {png}")
    from raytrieve.tracking import mlflow_run

    uri = cfg.tracking_uri()
    log(f"MLflow runs: {uri} (experiment {EXPERIMENT!r}); open the UI with:\n  {mlflow_run.ui_command(uri)}")
    return DemoResult(rep, md, png, time.monotonic() - started)
