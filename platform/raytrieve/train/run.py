"""The driver side of a training job: check everything, plan the batches, build the Ray Data
stages, run TorchTrainer, track the run in MLflow.

    run_training(load_train_config("jobs/configs/dense_mnrl.yaml"), ray_address="local")

Every check that can fail (config values, data files and columns, the model, each loss's
arguments against the real model, the eval file) runs before any Ray work starts.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raytrieve._io import mark_used, redact
from raytrieve.data.files import INCOMPLETE, OutputStore, file_uri_path, is_uri, resolve
from raytrieve.data.pipeline import StreamSpec
from raytrieve.data.validate import Listing
from raytrieve.encoders import load_encoder
from raytrieve.errors import ConfigError, DataError, RaytrieveError
from raytrieve.kinds import model_kind
from raytrieve.losses.base import LossContract
from raytrieve.train.checkpoint import checkpoint_dir, claim_checkpoint_dir, finished_run, record_finished
from raytrieve.train.config import TrainConfig
from raytrieve.train.entry import WorkerSpec, train_loop_per_worker
from raytrieve.train.loop import build_losses
from raytrieve.train.plan import DatasetKeys, Plan, plan_training

log = logging.getLogger("raytrieve.train")


class TrainingError(RaytrieveError):
    """Training started but did not finish (the MLflow run is marked FAILED)."""


@dataclass
class Prepared:
    spec: WorkerSpec
    plan: Plan
    stream: StreamSpec
    pieces: list[list]  # per dataset: train_source.Piece, numbered (what workers read)
    rows: list[int]  # per dataset
    text_columns: list[list[str]]
    label_columns: list[str | None]
    prompts: list[list[str | None]]
    routes: list[list[str | None] | None]
    digests: list[str]  # per dataset: its values' digest (validate.DatasetReport.digest)


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    run_id: str | None
    model_version: str | None
    checkpoint: str | None
    dropped: list[str]
    tracking_uri: str | None = None  # the MLflow store the run is in
    already_complete: bool = False  # a rerun of a finished run: nothing trained, logged or registered
    # The evaluator's metrics at their last evaluation (the run's eval_* metrics in MLflow), so
    # the summary shows how the model does without opening MLflow; empty without eval.path.
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)


def prepare(cfg: TrainConfig, where: str = "config", listed: Sequence[Listing] | None = None) -> Prepared:
    """All checks and the plan; no Ray. ``listed``: the datasets' listings, where the caller
    checked them already (``raytrieve train`` does before torch loads): each is listed once.
    ``cfg`` is left as given: the config the run uses (its output folder made absolute, each
    dataset's text columns and prompts filled in) is a copy, ``Prepared.spec.config``."""
    import pyarrow as pa

    from raytrieve.data.pipeline import DatasetStream, StreamSpec, column_prompts, column_routes, label_kind
    from raytrieve.data.validate import (
        exists,
        infer_format,
        is_numeric,
        list_datasets,
        read_table,
        sampler_keys,
        validate_dataset,
    )
    from raytrieve.losses.registry import base_class
    from raytrieve.model_ref import resolve_field
    from raytrieve.train.distributed import uses_gradient_cache
    from raytrieve.train.evaluate import select_eval_columns

    cfg = cfg.model_copy(deep=True)  # filled in below; the caller's config (it may run it again) is not
    cfg.output_dir = file_uri_path(cfg.output_dir)  # file://: a local folder, by every check
    if not is_uri(cfg.output_dir):
        cfg.output_dir = str(Path(cfg.output_dir).resolve())  # workers may run elsewhere than the driver's cwd
    _check_output(cfg, where)
    model_path = str(resolve_field(cfg.model.name_or_path, f"{where}.model.name_or_path"))
    _check_model(cfg, model_path, where)
    if cfg.model.inference_free:
        model_path = str(inference_free_router(model_path, _initial_model_root(cfg)))
    # Cheap checks of every dataset (schema, columns, types) before the model loads.
    if listed is None:
        listed = list_datasets(cfg, where)
    keys = sampler_keys(cfg)
    for i, d in enumerate(cfg.datasets):
        validate_dataset(d, cfg.model.kind, f"{where}.datasets[{i}]", keys=keys, scan=False, listed=listed[i])
    # The real model and every loss, built once here so a bad loss argument (or a model the
    # loss cannot use) fails now rather than on every worker.
    encoder = load_encoder(cfg.model.kind, model_path, trust_remote_code=cfg.model.trust_remote_code)
    losses = build_losses(cfg, encoder, cfg.scaling.num_workers, where)
    if cfg.scaling.strategy == "fsdp" and any(uses_gradient_cache(loss) for loss in losses):
        raise ConfigError(f"{where}.scaling.strategy: cached (GradCache) losses run under ddp only; set strategy: ddp")
    # Routes go with token ids: rows of texts are tokenized by the loss, not per column here.
    has_router = model_kind(cfg.model.kind).tokenized_rows and bool(encoder.first_module.routes())

    # The keys the prompts came from, for the warnings about them (the loop below fills the run-wide
    # prompts into the datasets that set none).
    prompt_keys = (
        ", ".join(
            [f"{where}.prompts"] * (cfg.prompts is not None)
            + [f"{where}.datasets[{i}].prompts" for i, d in enumerate(cfg.datasets) if d.prompts is not None]
        )
        or f"{where}.prompts"
    )
    text_columns, label_columns, prompts, routes, streams, planned, pieces, digests = [], [], [], [], [], [], [], []
    for i, d in enumerate(cfg.datasets):
        # One streaming pass per dataset: checks, row counts and the planner's keys (a hash per
        # text value or the label: a few bytes per row, never the texts).
        report = validate_dataset(d, cfg.model.kind, f"{where}.datasets[{i}]", keys=keys, listed=listed[i])
        text_columns.append(report.text_columns)
        label_columns.append(report.label_column)
        d.columns = report.text_columns
        if d.prompts is None and cfg.prompts is not None:  # the run-wide prompts, for the columns this dataset has
            d.prompts = (
                cfg.prompts
                if isinstance(cfg.prompts, str)
                else {c: p for c, p in cfg.prompts.items() if c in report.text_columns}
            )
        if d.router_mapping and not has_router:  # (validate_dataset checked its columns)
            raise ConfigError(
                f"{where}.datasets[{i}].router_mapping: the model has no Router, so routes do nothing; leave it out, "
                "or train a Router model (model.inference_free: true for SPLADE)"
            )
        if model_kind(cfg.model.kind).tokenized_rows:
            prompts.append([column_prompts(d)[c] for c in report.text_columns])
        else:  # a cross-encoder: one prompt (config checked it is a string) before each pair's query
            prompts.append(
                [d.prompts if isinstance(d.prompts, str) else None] + [None] * (len(report.text_columns) - 1)
            )
        routes.append([column_routes(d)[c] for c in report.text_columns] if has_router else None)
        contract = base_class(d.loss, cfg.model.kind)
        least = _least_batch(cfg, i, contract, len(report.text_columns))
        _check_batch_has_negatives(cfg, i, contract, least, where)
        # Labels reach the loss whenever the dataset names a numeric label column.
        label = (
            report.label_column
            if report.label_column and (contract.needs_labels or is_numeric(report.types[report.label_column]))
            else None
        )
        streams.append(
            DatasetStream(
                report.text_columns,
                label,
                prompts[-1],
                routes[-1],
                label_kind(report.types.get(label) if label else None, contract.listwise),
                tuple(pa.types.is_list(report.types[c]) for c in report.text_columns),
            )
        )
        planned.append(DatasetKeys(d.name, report.rows, report.text_keys, report.label_keys, d.weight, least))
        pieces.append(report.pieces)
        digests.append(report.digest)

    if isinstance(cfg.prompts, dict):
        seen = {c for columns in text_columns for c in columns}
        unknown = [c for c in cfg.prompts if c not in seen]
        if unknown:
            raise ConfigError(
                f"{where}.prompts: {unknown} are no text column of any dataset ({sorted(seen)}); fix the names"
            )

    eval_columns = None
    if cfg.eval.path:
        path = cfg.eval.path  # a local path or a URI, as the datasets' (read here: an eval set is small)
        if not exists(path):
            raise DataError(f"{where}.eval.path: {path} does not exist")
        if cfg.eval.evaluator is None:  # check_values says so too; a config built in Python may skip it
            raise ConfigError(f"{where}.eval.evaluator is required when eval.path is set")
        # eval: has no format: key; its file's name says the format
        named = f"check the file; {where}.eval.path is read by its name's suffix (.parquet, .jsonl, .csv, ...)"
        eval_columns = select_eval_columns(
            read_table(path, infer_format(path, named), named).to_pydict(),
            cfg.eval.evaluator,
            cfg.eval.columns,
            f"{where}.eval.path ({path})",
            f"{where}.eval.columns",
        )

    world = cfg.scaling.num_workers
    plan = plan_training(planned, cfg.training, world)
    rows = [k.rows for k in planned]
    del planned  # the keys: the plan is all that is needed from here
    if plan.optimizer_steps == 0:
        raise DataError(
            f"{where}: the data gives no full optimizer step (batch_size {cfg.training.batch_size} x "
            f"{world} worker(s) x gradient_accumulation_steps {cfg.training.gradient_accumulation_steps}); "
            f"rows: {', '.join(f'{d.name}={n}' for d, n in zip(cfg.datasets, rows))}"
            + "".join(f"; not trained on: {line}" for line in plan.dropped)
        )
    cpu = cfg.scaling.resources_per_worker.get("CPU", 1)
    stream = StreamSpec(model_path, cfg.model.kind, streams, cfg.model.max_seq_length)
    spec = WorkerSpec(
        config=cfg,
        model_path=model_path,
        optimizer_steps=plan.optimizer_steps,
        stream=stream,
        micro_batch_epoch=plan.epoch,
        micro_batch_rows=plan.rank_sizes,
        eval_columns=eval_columns,
        threads=cfg.scaling.torch_threads or max(1, int(cpu)),
        samples_per_step=cfg.training.batch_size * world * cfg.training.gradient_accumulation_steps,
    )
    if model_kind(cfg.model.kind).tokenized_rows:
        spec.model_prompts = _trained_prompts(cfg, text_columns, prompts, encoder, has_router, prompt_keys)
    else:
        spec.model_prompts, spec.model_default_prompt = _trained_pair_prompt(prompts, encoder, prompt_keys)
    return Prepared(spec, plan, stream, pieces, rows, text_columns, label_columns, prompts, routes, digests)


def _trained_prompts(
    cfg: TrainConfig,
    text_columns: list[list[str]],
    prompts: list[list[str | None]],
    loaded: Any,
    has_router: bool,
    keys: str,
) -> dict[str, str]:
    """The prompt each role ("query": a dataset's first column or its router_mapping's, else
    "document"; a one-column dataset's texts are both) trained with, where every column of that
    role in every dataset had the same one: the trained model keeps it under that name, so
    encode_query / encode_document (the evaluator, the encoding job, Serve) add what training
    added. Without it a model trained on "query: ..." was saved without the prompt, and
    everything downstream encoded without it. A role trained with several prompts (or with and
    without), or without one where the ``loaded`` model has its own, keeps the model's own, with
    a warning. Cross-encoders read pairs, not roles: ``_trained_pair_prompt``."""
    from raytrieve.data.pipeline import column_routes

    by_role: dict[str, set[str | None]] = {}
    for d, columns, given in zip(cfg.datasets, text_columns, prompts):
        routes = column_routes(d)
        for c, p in zip(columns, given):
            # a Router trains a one-column dataset through its query route only
            both = len(columns) == 1 and not d.router_mapping and not has_router
            roles = ("query", "document") if both else (routes[c] or "document",)
            for role in roles:
                by_role.setdefault(role, set()).add(p)
    kept: dict[str, str] = {}
    for role, seen in sorted(by_role.items()):
        own = loaded.prompt_name_for(role)
        if len(seen) > 1:
            log.warning(
                "%s: the %s columns trained with different prompts (%s); the model's %s prompt is left as "
                "loaded (%s): give every %s column the same prompt for the model to keep it",
                keys,
                role,
                ", ".join(sorted("none" if p is None else repr(p) for p in seen)),
                role,
                "none" if own is None else repr(loaded.prompts[own]),
                role,
            )
        elif (only := next(iter(seen))) is not None:
            kept[role] = only
        elif own is not None and loaded.prompts[own]:
            log.warning(
                "%s: the %s columns trained without a prompt, but the model adds its %r prompt %r to every "
                "%s it encodes, and so will the trained model; give the %s columns that prompt to train as it is used",
                keys,
                role,
                own,
                loaded.prompts[own],
                role,
                role,
            )
    return kept


def _trained_pair_prompt(prompts: list[list[str | None]], loaded: Any, keys: str) -> tuple[dict[str, str], str | None]:
    """A cross-encoder's prompt (before each pair's query) where every dataset trained with the
    same one: the trained model keeps it as its default prompt (under the loaded model's default
    name, else "query"), so that predict, rank, the evaluator, mining's reranker and Serve's
    /rerank score pairs as training did; a default prompt the loaded model had is replaced by the
    trained one. Returns (prompts to set, default prompt name). Several prompts, or none where the
    model has a default one: the model's own, with a warning."""
    seen = {given[0] for given in prompts}
    own = loaded.default_prompt_name
    own_text = loaded.prompts.get(own) if own is not None else None
    if len(seen) > 1:
        log.warning(
            "%s: the datasets trained with different prompts (%s); the model's default prompt is left as "
            "loaded (%s): give every dataset the same prompt for the model to keep it",
            keys,
            ", ".join(sorted("none" if p is None else repr(p) for p in seen)),
            "none" if own_text is None else repr(own_text),
        )
        return {}, None
    only = next(iter(seen))
    if only is not None:
        name = own or "query"
        return {name: only}, name
    if own_text:
        log.warning(
            "%s: the pairs trained without a prompt, but the model puts its default prompt %r (%r) before "
            "every query it scores, and so will the trained model; give the datasets that prompt to train as it "
            "is used",
            keys,
            own,
            own_text,
        )
    return {}, None


def _least_batch(cfg: TrainConfig, i: int, contract: type[LossContract], n_columns: int) -> int:
    """Fewest rows of a global batch that give dataset i's loss a negative: a loss whose
    negatives are the batch's other rows is a constant 0 when the batch it sees (gathered over
    the ranks, or one rank's slice) holds one row and the data gives no negative column."""
    if not contract.in_batch_negatives or n_columns > contract.columns[0]:
        return 1
    return 2 if _gathers(cfg, i) else 2 * cfg.scaling.num_workers


def _gathers(cfg: TrainConfig, i: int) -> bool:
    return cfg.scaling.num_workers > 1 and bool(cfg.datasets[i].loss.base.args.get("gather_across_devices"))


def _check_batch_has_negatives(cfg: TrainConfig, i: int, contract: type[LossContract], least: int, where: str) -> None:
    """A configured batch below ``least`` (``_least_batch``): the run would finish, log a flat
    loss and change nothing. Batches the sampler makes smaller are left out by the plan."""
    world = cfg.scaling.num_workers
    if cfg.training.batch_size * world < least:
        gathered = _gathers(cfg, i)
        rows = cfg.training.batch_size * (world if gathered else 1)
        name = cfg.datasets[i].loss.base.name
        gather = "" if world == 1 or gathered else " or set gather_across_devices: true,"
        extra = "" if contract.columns[1] == contract.columns[0] else " or add a hard-negative column,"
        raise ConfigError(
            f"{where}.training.batch_size: {name} ({where}.datasets[{i}].loss) takes its negatives from the other "
            f"rows of a batch, and a batch of {rows} row has none, so its loss is always the same and training "
            f"changes nothing; raise training.batch_size to 2 or more,{gather}{extra} or choose a loss "
            "whose negatives come from the data"
        )


def _check_output(cfg: TrainConfig, where: str) -> None:
    """The trained model replaces ``output_dir`` whole (on disk an atomic rename; on an object
    store file by file, ``OutputStore.replace_with``): refuse a folder that is not an earlier
    model (a file, other files, the working folder or one above it) and checkpoints inside it,
    which the final save would delete."""
    import pyarrow.fs as pafs

    from raytrieve._io import check_replaceable

    if is_uri(cfg.output_dir):
        store = OutputStore(cfg.output_dir)
        try:  # a bucket itself is refused too: the checkpoints' default would be another bucket
            store.check_replaceable("modules.json", f"{where}.output_dir")
        except DataError as e:
            raise ConfigError(str(e)) from None
        out = store.fs, store.root
    else:
        path = Path(cfg.output_dir)
        if path == Path.cwd() or path in Path.cwd().parents:
            raise ConfigError(
                f"{where}.output_dir {path}: the working folder or one above it, which the trained model would "
                "replace whole; name a folder of its own"
            )
        check_replaceable(path, "modules.json", f"{where}.output_dir")
        out = pafs.LocalFileSystem(), str(path.resolve())
    ckpt_fs, ckpt = resolve(checkpoint_dir(cfg))  # a file:// URI is a local folder too
    if type(ckpt_fs) is type(out[0]) and (ckpt.rstrip("/") + "/").startswith(out[1].rstrip("/") + "/"):
        raise ConfigError(
            f"{where}.checkpoint.dir {ckpt}: inside output_dir {out[1]}, which the trained model replaces whole at "
            "the end, checkpoints and all; put them beside it (the default is <output_dir>.checkpoints)"
        )


def _holds_a_model(location: str) -> bool:
    """A whole model at ``location``: on an object store, not one whose write was cut short."""
    store = OutputStore(location)
    return store.exists("modules.json") and not store.exists(INCOMPLETE)


def _check_model(cfg: TrainConfig, model_path: str, where: str) -> None:
    """A model of another kind than ``model.kind`` (by its files) and a ``max_seq_length`` past
    its position embeddings are refused here: in the workers they failed with a KeyError, or a
    cross-encoder's logits trained as a dense model's embeddings."""
    from raytrieve.kinds import refuse_other_kind
    from raytrieve.model_ref import check_max_seq_length

    out, model = Path(cfg.output_dir).resolve(), Path(model_path).resolve()
    if is_uri(cfg.output_dir):  # the model's own URI inside output_dir (its copy in the cache never is)
        out_fs, out_path = resolve(cfg.output_dir)
        if is_uri(cfg.model.name_or_path):
            model_fs, model_path_in = resolve(cfg.model.name_or_path)
            inside = (model_path_in.rstrip("/") + "/").startswith(out_path.rstrip("/") + "/")
            if type(model_fs) is type(out_fs) and inside:
                raise ConfigError(
                    f"{where}.output_dir {redact(cfg.output_dir)}: holds the model being trained "
                    f"({where}.model.name_or_path {redact(cfg.model.name_or_path)}), which the trained model would "
                    "replace; name another folder"
                )
    elif model == out or out in model.parents:
        raise ConfigError(
            f"{where}.output_dir {out}: holds the model being trained ({where}.model.name_or_path "
            f"{redact(cfg.model.name_or_path)}), which the trained model would replace whole; name another folder"
        )
    label = f"{where}.model.name_or_path: {redact(cfg.model.name_or_path)}"
    fix = f"set model.kind: {{name}}, or name a {cfg.model.kind} model"
    refuse_other_kind(model_path, model_kind(cfg.model.kind).serve_field, label, fix)
    check_max_seq_length(Path(model_path), cfg.model.max_seq_length, f"{where}.model.max_seq_length")


def _initial_model_root(cfg: TrainConfig) -> Path:
    """Where an inference-free run's initial model is built: its checkpoint folder, or, where
    that is an object store, raytrieve's cache (whose folders travel to the workers: model_ref.ship)."""
    from raytrieve.assets import cache_dir

    root = checkpoint_dir(cfg)
    return cache_dir() / "initial-models" if is_uri(root) else Path(root)


def inference_free_router(model_path: str, root: Path) -> Path:
    """An inference-free SPLADE built from a SPLADE model: static query weights (start at 1),
    the model itself on the document side, in ``root``/initial-model-<the source's folder and
    files>. A rerun reuses the one built from the same model; another model (a config changed
    after a run that stopped before its first checkpoint) gets a folder of its own, where the
    first one's had been reused (and a refused run never replaces another run's)."""
    import hashlib

    from raytrieve.assets import fingerprint

    source = f"{Path(model_path).resolve()}:{fingerprint(Path(model_path))}"
    target = root / f"initial-model-{hashlib.sha256(source.encode()).hexdigest()[:12]}"
    if (target / "modules.json").exists():
        return mark_used(target)
    import torch

    from raytrieve._io import atomic_directory
    from raytrieve.encoders import SparseEncoder
    from raytrieve.modules import Router, SparseStaticEmbedding

    sparse = SparseEncoder(model_path, device="cpu")
    if sparse.first_module.routes():
        raise ConfigError(f"model.inference_free: {model_path} already is a Router model; set inference_free: false")
    tokenizer = sparse.tokenizer
    static = SparseStaticEmbedding(tokenizer, weight=torch.ones(len(tokenizer)))
    router = SparseEncoder([Router.for_query_document([static], sparse.modules_list)], device="cpu")
    with atomic_directory(target) as tmp:
        router.save(tmp)
    return target


def open_run(storage: str, uri: str, cfg: TrainConfig, params: dict[str, str]) -> str:
    """The MLflow run this training logs into: on a rerun that resumes checkpoints, the run that
    wrote them (its metrics go on from the resumed step, one history); else a new run. Recorded
    in the checkpoint folder's stamp either way."""
    from raytrieve.tracking import mlflow_run
    from raytrieve.train.checkpoint import record_mlflow_run, run_to_resume

    earlier = run_to_resume(storage, uri)
    if earlier is not None and mlflow_run.reopen_run(uri, earlier, cfg.mlflow.experiment):
        log.info("resuming MLflow run %s", earlier)
        run_id = earlier
    else:
        run_id = mlflow_run.start_run(uri, cfg.mlflow.experiment, cfg.mlflow.run_name, cfg.mlflow.tags, params)
    record_mlflow_run(storage, uri, run_id)
    return run_id


def build_datasets(p: Prepared) -> dict[str, Any]:
    """Each rank's Ray Dataset per epoch, ``rank{r}_epoch{e}`` (lazy: an epoch's reads start when
    the rank starts iterating it, and a resumed run never opens the epochs it finished)."""
    from raytrieve.data.pipeline import rank_epoch_dataset

    plan = p.plan
    out = {}
    for e in np.unique(plan.epoch).tolist():
        for r in range(plan.world_size):
            lookups = []
            for d in range(len(p.pieces)):
                ms = np.nonzero((plan.epoch == e) & (plan.dataset == d))[0]
                if not len(ms):
                    lookups.append(None)
                    continue
                rows, keys = plan.rank_stream(r, ms)
                order = np.argsort(rows, kind="stable")
                lookups.append((rows[order].astype(np.int64), keys[order]))
            ds = rank_epoch_dataset(p.pieces, lookups, p.stream)
            if ds is not None:
                out[f"rank{r}_epoch{e}"] = ds
    return out


def training_data(cfg: TrainConfig, p: Prepared) -> dict[str, dict[str, Any]]:
    """What a resumed run must read, by dataset name: its rows and its values' digest (the plan's
    row counts alone would not tell a changed text). Not where the files lie, nor their times:
    the same data copied again, or moved, resumes its checkpoints."""
    return {d.name: {"rows": n, "sha256": h} for d, n, h in zip(cfg.datasets, p.rows, p.digests, strict=True)}


def input_files(pieces: list[list[Any]]) -> dict[str, list[int | None]]:
    """Each training input file's [size, modification time in ns]: the data key of run stamps an
    earlier raytrieve wrote (``checkpoint.older_run_identity``), so their checkpoints resume."""
    from raytrieve.data.sources import resolve

    out: dict[str, list[int | None]] = {}
    for path in sorted({piece.path for dataset in pieces for piece in dataset}):
        fs, inner = resolve(path)
        info = fs.get_file_info(inner)
        out[path] = [info.size, info.mtime_ns]
    return out


def _checkpoint_location(storage: str, path: str) -> str:
    """Ray Train's path of a checkpoint (inside the storage's filesystem) as a location that opens
    anywhere: a URI when the storage is an object store."""
    from raytrieve.data.files import with_scheme
    from raytrieve.errors import DataError

    if not is_uri(storage):
        return path
    try:  # without the keys a URI may hold: the result is recorded in the run's stamp
        return redact(with_scheme(storage, resolve(storage)[1], path))
    except DataError:  # the run has finished: naming its checkpoint must not fail it
        return path


def _check_room_for_the_data_stage(cfg: TrainConfig, cluster_cpus: float, where: str) -> None:
    """Ray Data's sort runs whole-CPU tasks: with every CPU held by train workers it would wait
    forever (Ray only logs that tasks are pending), so refuse to start instead."""
    per_worker = cfg.scaling.resources_per_worker.get("CPU", 1.0)
    free = cluster_cpus - per_worker * cfg.scaling.num_workers
    if free < 1:
        raise ConfigError(
            f"{where}.scaling: {cfg.scaling.num_workers} worker(s) x {per_worker} CPU leave {free:g} of the cluster's "
            f"{cluster_cpus:g} CPUs; the data stage (read, tokenize, sort) needs at least 1 free CPU. Lower "
            "scaling.resources_per_worker.CPU (torch_threads sets the threads) or add CPUs"
        )


def _scaling_config(cfg: TrainConfig) -> Any:
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker=cfg.scaling.resources_per_worker or None,
        placement_strategy=cfg.scaling.placement_strategy,
    )


def _autoscaler_checks_resources() -> bool:
    """Whether the cluster's autoscaler publishes the most each resource can grow to (Ray Train
    then refuses a worker group that could never fit, itself)."""
    from ray._private import state

    try:
        return bool(state.state.get_max_resources_from_cluster_config())
    except Exception:  # an older GCS without the call: nothing known
        return False


def _check_workers_fit(cfg: TrainConfig, nodes: list[dict[str, float]], where: str, fixed: bool) -> None:
    """Ray Train waits for nodes that can hold every worker, retrying every minute, forever: on
    a cluster that cannot grow (``fixed``: the embedded Ray) refuse; on one an autoscaler may
    grow, warn. (A cluster whose autoscaler publishes its node types is checked by Ray Train.)"""
    from raytrieve.sizing import bundles_that_fit

    # What Ray Train asks per worker: use_gpu adds a GPU; no resources_per_worker is 1 CPU (or 1 GPU).
    bundle = dict(_scaling_config(cfg)._resources_per_worker_not_none)
    fits = bundles_that_fit(nodes, bundle, cfg.scaling.placement_strategy)
    if fits >= cfg.scaling.num_workers:
        return
    has = "; ".join(
        f"node {i}: " + ", ".join(f"{r} {node.get(r, 0.0):g}" for r in bundle) for i, node in enumerate(nodes)
    )
    what = (
        f"{where}.scaling: {cfg.scaling.num_workers} worker(s) of "
        f"{', '.join(f'{r} {need:g}' for r, need in bundle.items())} each ({cfg.scaling.placement_strategy}) "
        f"do not fit the {'machine' if fixed else 'cluster'} ({has}): {fits} would"
    )
    gpu = " or set scaling.use_gpu: false" if bundle.get("GPU") and not any(n.get("GPU") for n in nodes) else ""
    if fixed:
        raise ConfigError(f"{what}. Lower scaling.num_workers or scaling.resources_per_worker{gpu}")
    log.warning(
        "%s yet. Ray Train waits for nodes that hold them, retrying every minute; if none join it waits forever: "
        "stop the job and lower scaling.num_workers or scaling.resources_per_worker%s",
        what,
        gpu,
    )


def _stoppable_trainer(*args: Any, **kwargs: Any) -> Any:
    """A TorchTrainer that Ctrl-C and SIGTERM stop as they stop every raytrieve job
    (``jobs_entry``): the interrupt raises out of ``fit``, the MLflow run ends KILLED, the command
    prints its one line and exits 130 or 143.

    Ray Train's own ``fit`` installs a SIGINT handler (and leaves it installed) that aborts the run
    and then calls ``sys.exit(0)``: Ctrl-C ended ``raytrieve train`` by SystemExit, no line, and
    its MLflow run FAILED. This trainer installs none and keeps the run's controller, so that
    ``stop`` can end the run when ``fit`` is interrupted in a process that lives on (a notebook,
    a test): the workers share the controller's fate. A driver that exits ends them anyway."""
    import ray
    from ray.train.torch import TorchTrainer

    from raytrieve.ray_cluster import leave_behind, own_placement_groups

    class Trainer(TorchTrainer):
        controller: Any = None
        groups_before: frozenset[str] = frozenset()

        def _register_sigint_handler(self, controller: Any) -> None:
            # Ray Train 2.60's hook in fit (Ray is pinned); if a Ray upgrade renames it, the
            # Ctrl-C test in test_train_e2e fails on Ray's SystemExit. Called before the run starts.
            self.controller = controller
            self.groups_before = own_placement_groups()

        def stop(self) -> None:
            """End the run: kill its controller (Ray ends it at once, its workers with it). The
            placement group it made for its workers is left to the next job this process runs
            (``ray_cluster.leave_behind``): Ray Train's cleaner removes one only once the workers
            have started, so a run stopped while they start kept their CPUs reserved for as long
            as this process lived, and the next run here waited forever for its data stage."""
            if self.controller is None:
                return
            ray.kill(self.controller)
            # The kill lands apart from calls: once a call fails, the controller is gone and
            # makes no group after the one noted here. Bounded: `ray job stop` SIGKILLs 3 s on.
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                ready, _ = ray.wait([self.controller.__ray_ready__.remote()], timeout=0.5)
                try:
                    if ready:
                        ray.get(ready[0])
                        time.sleep(0.05)
                except Exception:  # RayActorError: dead, as asked
                    break
            # The workers' group has one bundle per worker: a group this job made meanwhile
            # otherwise (a Serve deployment's, a user's own) is none of the run's.
            workers = self.scaling_config.num_workers  # an int: raytrieve sets no elastic range
            leave_behind(own_placement_groups(workers if isinstance(workers, int) else None) - self.groups_before)

    return Trainer(*args, **kwargs)


def _end_stopped_run(uri: str, run_id: str, trainer: Any) -> None:
    """A run stopped by Ctrl-C or SIGTERM: its MLflow run KILLED first (`ray job stop` SIGKILLs the
    driver 3 s after its SIGTERM), then its controller stopped. Neither failing may turn the
    interrupt into a traceback: a failure is a warning."""
    from raytrieve.tracking import mlflow_run

    try:
        mlflow_run.end_run(uri, run_id, "KILLED")
    except Exception as e:
        log.warning("could not mark MLflow run %s KILLED: %s", run_id, e)
    try:
        if trainer is not None:
            trainer.stop()
    except Exception as e:
        log.warning("could not stop the training run: %s", e)


def run_training(
    cfg: TrainConfig, where: str = "config", ray_address: str | None = None, listed: Sequence[Listing] | None = None
) -> TrainResult:
    """Train as ``cfg`` says. ``ray_address``: None joins the cluster this job runs on (``ray job
    submit``), "local" starts an embedded Ray. ``listed``: as ``prepare``'s."""
    from raytrieve.train.card_facts import driver_facts

    started = time.time()
    p = prepare(cfg, where, listed)
    cfg = p.spec.config  # the checked config, filled in
    p.spec.card = driver_facts(cfg, p, started)  # rank 0 completes it and writes the model card
    for line in p.plan.dropped:
        log.warning("not trained on: %s", line)
    storage = claim_checkpoint_dir(cfg, p.plan, where, training_data(cfg, p), lambda: input_files(p.pieces))
    earlier = finished_run(storage)
    if earlier is not None and _holds_a_model(cfg.output_dir):
        # As the encoding job does: a finished run's rerun would resume at its last step, train
        # nothing, and log an empty MLflow run and register the same weights as a new version.
        log.info("%s: already trained (MLflow run %s); nothing to do", redact(cfg.output_dir), earlier.get("run_id"))
        return TrainResult(**{**earlier, "already_complete": True})

    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig

    from raytrieve.progress import ClusterCount, stage
    from raytrieve.ray_cluster import connect
    from raytrieve.tracking import mlflow_run

    uri = mlflow_run.tracking_uri(cfg.mlflow.tracking_uri)
    mlflow_run.check_store(uri, cfg.mlflow.experiment, cfg.mlflow.tags, where)
    p.stream.make_portable()  # the read tasks then tokenize without importing transformers
    if ray_address == "local" and not ray.is_initialized():  # the embedded Ray will have this machine's CPUs
        from ray._private.accelerators import get_accelerator_manager_for_resource
        from ray._private.utils import get_num_cpus

        _check_room_for_the_data_stage(cfg, float(get_num_cpus()), where)
        gpu_manager = get_accelerator_manager_for_resource("GPU")
        gpus = gpu_manager.get_current_node_num_accelerators() if gpu_manager else 0
        _check_workers_fit(cfg, [{"CPU": float(get_num_cpus()), "GPU": float(gpus)}], where, fixed=True)
    connect(ray_address)
    _check_room_for_the_data_stage(cfg, ray.cluster_resources().get("CPU", 0.0), where)
    if ray_address == "local" or not _autoscaler_checks_resources():  # "local": this process's Ray, it cannot grow
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        _check_workers_fit(cfg, nodes, where, fixed=ray_address == "local")
    if cfg.scaling.torch_threads is None and "CPU" not in cfg.scaling.resources_per_worker:
        from raytrieve.sizing import cluster_shape, train_threads

        p.spec.threads = train_threads(cluster_shape(), cfg.scaling.num_workers)
    log.info("%d worker(s), %d torch thread(s) each", cfg.scaling.num_workers, p.spec.threads)
    from raytrieve.model_ref import ship

    # A folder in this machine's cache (a models:/ download, a converted variant) travels to the workers.
    p.spec.shipped = p.stream.shipped = ship(p.spec.model_path)
    params = mlflow_run.flatten(cfg)
    params.update(
        {
            "plan.optimizer_steps": str(p.plan.optimizer_steps),
            "plan.epochs": str(len(p.plan.steps_per_epoch)),
            "plan.not_trained_on": "; ".join(p.plan.dropped)[: mlflow_run.PARAM_LIMIT] or "none",
            "model.resolved_path": p.spec.model_path,
            "scaling.resolved_torch_threads": str(p.spec.threads),
        }
    )
    status: mlflow_run.RunStatus = "FAILED"
    trainer = None
    run_id = open_run(storage, uri, cfg, params)
    try:  # at once: from here on, every way out ends the MLflow run (Ctrl-C included)
        p.spec.tracking_uri, p.spec.run_id = uri, run_id
        p.spec.progress_key = f"train-{uuid.uuid4().hex}"  # rank 0's steps, for the driver's progress
        import ray.data

        options = ray.data.ExecutionOptions()
        options.preserve_order = True
        trainer = _stoppable_trainer(
            train_loop_per_worker,
            train_loop_config={"spec": p.spec},
            scaling_config=_scaling_config(cfg),
            torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
            datasets=build_datasets(p),
            dataset_config=DataConfig(datasets_to_split=[], execution_options=options),
            run_config=RunConfig(
                name="run",
                storage_path=storage,  # a local path or an object store's URI (Ray Train opens either)
                failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
                # Ray Train's INFO lines (worker group started, each checkpoint reported) would
                # print between the progress lines; they stay in its log files under the session.
                logging_config=LoggingConfig(log_level="WARNING"),
                # Ray starts workers with OMP_NUM_THREADS=1 (from their CPU share); torch's thread
                # pool must be sized from process start, or later set_num_threads calls leave
                # threads that were created for one core fighting over it.
                worker_runtime_env={
                    "env_vars": {"OMP_NUM_THREADS": str(p.spec.threads), "MKL_NUM_THREADS": str(p.spec.threads)}
                },
            ),
        )
        count = ClusterCount(p.spec.progress_key)
        try:
            with stage("train", total=p.plan.optimizer_steps, unit="step") as bar, count.follow(bar):
                result = trainer.fit()
        except Exception as e:
            raise TrainingError(f"training failed: {e}") from e
        version = None
        if cfg.mlflow.register_model_as:
            version = mlflow_run.register_model(uri, run_id, cfg.mlflow.register_model_as)
        status = "FINISHED"
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, `ray job stop`: stopped by its user, not failed
        status = "KILLED"
        raise
    finally:
        if status == "KILLED":
            _end_stopped_run(uri, run_id, trainer)
        else:
            mlflow_run.end_run(uri, run_id, status)
    ckpt = _checkpoint_location(storage, result.checkpoint.path) if result.checkpoint is not None else None
    # Without the keys a URI may hold: the result is recorded in the run's stamp and printed.
    trained = TrainResult(redact(cfg.output_dir), p.plan.optimizer_steps, run_id, version, ckpt, p.plan.dropped, uri)
    if cfg.eval.path:
        try:  # for the summary only: the run is finished and registered whatever this read does
            trained.eval_metrics = mlflow_run.read_evaluation(uri, run_id)
        except Exception as e:  # MLflow's store errors share no base class worth naming here
            log.warning("could not read the run's evaluation metrics back from MLflow (%s); they are in the run", e)
    record_finished(storage, dataclasses.asdict(trained))
    return trained
