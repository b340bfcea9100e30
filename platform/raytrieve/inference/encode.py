"""The corpus encoding job: corpus -> read + check + tokenize (light CPU actors) -> encode and
write (actor pool, a GPU each when the cluster has GPUs) -> parquet shards + sidecars, then a
manifest.

    result = run_encode(load_encode_config("jobs/configs/encode_pydocs.yaml"), ray_address="local")

The driver plans and commits; the data never flows through it:

1. Plan: list the input files and cut them into shards from metadata (data/sources.py). The
   driver loads each model once to check the config against it (prompt names, dimensions)
   and, for int8, calibrates ranges on a bounded sample; the job's identity decides whether
   output_dir may be written (inference/encode_plan.py).
2. Duplicate ids (Ray Data): the (id, position) of every valid row, grouped by id across
   the cluster; the ids seen more than once stay there, in the object store, and the driver
   gets their counts and the first few (inference/checks.py). The first row keeps the id.
3. With ``bad_rows: fail``, a scan of every shard (Ray Data tasks) for null and blank rows;
   the job stops here, naming the first bad rows, before anything is written. With
   ``skip`` the encode stage finds them as it reads.
4. Encode (Ray Data actors): every shard is read where it is processed. A shard whose
   finished output has the same content checksum and the same left-out rows is reused; the others are tokenized,
   encoded and written by the worker that encoded them (inference/stages.py).
5. Commit: the driver gathers the sidecars' facts and writes the manifest last
   (shards.VectorsManifest).

A rerun after any kill reuses every finished shard; a changed corpus re-encodes exactly the
shards whose content changed, and the job says which.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytrieve._io import redact
from raytrieve.data.sources import ShardSpec, Source, head_file, head_schema, is_uri, open_source, plan_shards
from raytrieve.errors import ConfigError, DataError, RaytrieveError
from raytrieve.inference import shards
from raytrieve.inference.checks import Duplicates
from raytrieve.inference.config import EncodeConfig
from raytrieve.inference.corpus import EXAMPLES, check_columns, needed_columns, raise_bad_rows
from raytrieve.inference.encode_plan import (
    STAGED_INPUT,
    STAGED_NEXT,
    calibration_sample,
    claim_output,
    job_fingerprint,
    job_identity,
    resolve_outputs,
    reuse_ranges,
)
from raytrieve.inference.stages import OutputSpec

log = logging.getLogger("raytrieve.encode")


class EncodeJobError(RaytrieveError):
    """The encoding job started but did not finish; finished shards are kept for a rerun."""


@dataclass
class EncodeResult:
    output_dir: str  # without the keys a URI may hold: the job's summary is printed and logged
    rows: int
    shards: int
    shards_written: int
    shards_reused: int
    bad_rows: int
    seconds: float
    rows_per_s: float
    already_complete: bool
    shards_changed: list[int] = field(default_factory=list)  # re-encoded because their content changed
    duplicate_ids: int = 0  # ids held by more than one row
    check_seconds: float = 0.0  # scan + duplicate-id check


def _location(path: str) -> str:
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def run_encode(
    cfg: EncodeConfig,
    where: str = "config",
    ray_address: str | None = None,
    dataset: Any = None,
    scratch: bool = False,
) -> EncodeResult:
    """Encode ``cfg.corpus`` as the config says. ``ray_address``: None joins the cluster this
    job runs on (``ray job submit``), "local" starts an embedded Ray. ``dataset``: a
    ``ray.data.Dataset`` to encode instead of ``cfg.corpus.path`` (written by the workers to
    ``<output_dir>/_input`` at every run, then sharded like any parquet folder; shards whose
    content is unchanged are reused). ``scratch``: ``output_dir`` is the caller's own cache, so
    the output of a job with other settings in it is replaced rather than refused."""
    start = time.perf_counter()
    cfg.check(where)
    store = shards.OutputStore(_location(cfg.output_dir))
    if dataset is not None:
        claim_output(store, None, where)  # before writing the dataset into it
        _init_ray(ray_address)
        # Beside the job's own _input until the job is known to be this folder's: a run refused
        # as another job must leave the input its shards (and any index, Serve) read untouched.
        cfg.corpus.path, cfg.corpus.format = _stage_dataset(dataset, cfg, store, STAGED_NEXT), "parquet"
    try:
        source, specs, outputs, described, identity = _plan(cfg, store, where, scratch, dataset is not None)
        fingerprint = job_fingerprint(identity)
        if store.exists(shards.JOB):  # a rerun: the first run's int8 ranges, so every shard shares them
            reuse_ranges(store.read_json(shards.JOB), outputs, described)

        _init_ray(ray_address)
        from raytrieve.inference import checks

        check_start = time.perf_counter()
        duplicates = checks.duplicate_ids(cfg, specs, EXAMPLES) if cfg.check_duplicate_ids else checks.Duplicates()
        if cfg.bad_rows == "fail":  # stop before anything is written, naming the first bad rows
            scanned = checks.scan(cfg, specs)
            bad_total = scanned.bad + duplicates.extra_rows
            if bad_total:
                raise_bad_rows(cfg.corpus.path, bad_total, checks.first_bad_rows(scanned, duplicates, cfg, EXAMPLES))
        check_seconds = time.perf_counter() - check_start
    except BaseException:  # refused (another job, bad rows): the folder's input stays as it was
        if dataset is not None:
            store.delete(STAGED_NEXT)
        raise
    if dataset is not None:  # this folder's job, checked: the staged dataset becomes its input
        cfg.corpus.path = _swap_staged(store)
        source = open_source(_location(cfg.corpus.path), cfg.corpus.format, field="corpus.path")
        specs = plan_shards(source, cfg.rows_per_shard)  # the same plan, at the input's paths

    # Checked: only now does the job write anything.
    if not store.exists(shards.JOB):
        store.write_json(
            shards.JOB,
            {
                "fingerprint": fingerprint,
                "identity": identity,
                "config": cfg.model_dump(mode="json"),
                "ranges": {o.kind: o.ranges for o in outputs if o.ranges is not None},
            },
        )
    store.remove_temporaries()
    from raytrieve.model_ref import ship

    for output in outputs:  # a folder in this machine's cache travels to the actors' machines
        output.shipped = ship(output.model_path)
    encode_start = time.perf_counter()
    done = _run_pipeline(cfg, outputs, specs, duplicates, store, fingerprint)
    seconds = time.perf_counter() - encode_start
    written = [s for s in done if done[s]["previous"] != "same"]
    changed = sorted(s for s in written if done[s]["previous"] in ("changed", "corrupt"))
    if changed:
        log.info("re-encoded %d shard(s) whose content changed or whose file was damaged: %s", len(changed), changed)
    rows = sum(d["rows"] for d in done.values())
    if not rows:
        raise DataError(
            f"{redact(cfg.corpus.path)}: every row is bad (null/empty {cfg.corpus.text_column} or null/duplicate "
            f"{cfg.corpus.id_column}); the shards list them (read_bad_rows)"
        )

    missing = [
        d["file"]
        for d in done.values()
        if not store.exists(d["file"]) or not store.exists(d["file"].replace(".parquet", ".json"))
    ]
    if missing:  # e.g. a node-local output_dir: each worker wrote to its own disk
        nodes = sorted({str(d["node"])[:12] for d in done.values() if d["file"] in missing})
        raise EncodeJobError(
            f"output_dir {store.describe()}: {len(missing)} shard file(s) written by node(s) {nodes} "
            f"are not visible to the driver (e.g. {missing[0]}); put output_dir on storage "
            "every node shares (a shared mount or an object store URI)"
        )
    manifest = _manifest(cfg, source, described, done, len(specs), duplicates.ids, fingerprint)
    body = manifest.to_json()
    previous = store.read_json(shards.MANIFEST) if store.exists(shards.MANIFEST) else None
    # Compared as JSON objects, not parsed: one of another shape (an older version's) is written anew.
    unchanged = isinstance(previous, dict) and {k: v for k, v in previous.items() if k != "created"} == body
    if not unchanged:
        store.write_json(shards.MANIFEST, {**body, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    for name in store.names():  # after the manifest: shards of an earlier, longer plan of this job
        index = shards.shard_index(name)
        if index is not None and index >= len(specs):
            store.delete(name)
    encoded_rows = sum(done[s]["rows"] for s in written)
    result = EncodeResult(
        store.describe(),
        rows,
        len(specs),
        len(written),
        len(specs) - len(written),
        manifest.corpus.bad_rows,
        round(time.perf_counter() - start, 3),
        round(encoded_rows / max(seconds, 1e-9), 2),
        unchanged and not written,
        changed,
        duplicates.ids,
        round(check_seconds, 3),
    )
    if result.already_complete:
        log.info("%s: already complete (%d rows in %d shards); nothing to do", store.describe(), rows, len(specs))
    else:
        log.info(
            "encoded %d rows (%d new shards, %d reused) at %.1f rows/s into %s",
            rows,
            result.shards_written,
            result.shards_reused,
            result.rows_per_s,
            store.describe(),
        )
    return result


def _manifest(
    cfg: EncodeConfig,
    source: Source,
    described: dict[str, Any],
    done: dict[int, dict[str, Any]],
    shard_count: int,
    duplicate_ids: int,
    fingerprint: str,
) -> shards.VectorsManifest:
    """The manifest of a finished run (without ``created``), from the shards' sidecar facts."""
    body = {
        "format": shards.FORMAT,
        "version": 2,
        "fingerprint": fingerprint,
        "corpus": {
            "path": source.location,
            "format": source.format,
            "files": len(source.files),
            "input_rows": sum(d["input_rows"] for d in done.values()),
            "bad_rows": sum(d["bad"] for d in done.values()),
            "duplicate_ids": duplicate_ids,
            "id_column": cfg.corpus.id_column,
            "text_column": cfg.corpus.text_column,
            "title_column": cfg.corpus.title_column,
            "title_separator": cfg.corpus.title_separator,
        },
        "rows": sum(d["rows"] for d in done.values()),
        "side": cfg.side,
        **{k: {**v, "dtypes_used": _dtypes_used(done, k)} for k, v in described.items()},
        "shards": [
            {
                "file": done[s]["file"],
                "rows": done[s]["rows"],
                "input_rows": done[s]["input_rows"],
                "sha256": done[s]["sha256"],
                "checksum": done[s]["checksum"],
            }
            for s in range(shard_count)
        ],
    }
    # Validated on the way out too: a wrong type here would otherwise surface only in a reader.
    return shards.VectorsManifest.model_validate(body)


def _dtypes_used(done: dict[int, dict[str, Any]], kind: str) -> list[str]:
    """The compute formats the encode actors chose for ``kind``'s model, over every shard."""
    return sorted({d for row in done.values() if (d := json.loads(row.get("dtypes") or "{}").get(kind))})


def _init_ray(ray_address: str | None) -> None:

    from raytrieve.ray_cluster import connect

    connect(ray_address)


def _plan(
    cfg: EncodeConfig, store: shards.OutputStore, where: str, scratch: bool, staged: bool
) -> tuple[Any, list[Any], list[OutputSpec], dict[str, Any], dict[str, Any]]:
    """The corpus read, its shard plan, the models resolved, and this job's identity, claimed in
    ``store`` (a folder of another job is refused here). ``staged``: the corpus is a dataset
    written beside the job's input, whose identity is that of the input it becomes."""
    source = open_source(_location(cfg.corpus.path), cfg.corpus.format, field="corpus.path")
    first = head_file(source)  # named where the path is a folder or a glob: a stray file in it shows
    shown = cfg.corpus.path if first.endswith(Path(cfg.corpus.path).name) else f"{cfg.corpus.path} (its file {first})"
    check_columns(head_schema(source), cfg.corpus, redact(shown))
    specs = plan_shards(source, cfg.rows_per_shard)
    if not specs:
        raise DataError(f"{redact(cfg.corpus.path)}: the corpus has no rows")
    outputs, described = resolve_outputs(cfg, calibration_sample(cfg, specs), where)
    location = _location(store.describe(STAGED_INPUT)) if staged else None
    identity = job_identity(cfg, source, described, location)
    claim = claim_output(store, identity, where, scratch, cfg, described)
    return source, specs, outputs, described, claim or identity


def _swap_staged(store: shards.OutputStore) -> str:
    """The staged dataset (``STAGED_NEXT``) becomes the job's input (``STAGED_INPUT``); returns
    its location. A rename where the store can; an object store's files are copied, then the
    staged ones deleted (a run killed in between writes the dataset again: it is staged anew)."""
    store.delete(STAGED_INPUT)
    source, target = store.path(STAGED_NEXT), store.path(STAGED_INPUT)
    if store.renames:
        store.fs.move(source, target)
    else:
        import pyarrow.fs as pafs

        store.fs.create_dir(target, recursive=True)
        for info in store.fs.get_file_info(pafs.FileSelector(source)):
            store.fs.copy_file(info.path, f"{target}/{Path(info.path).name}")
        store.delete(STAGED_NEXT)
    return store.describe(STAGED_INPUT)


def _stage_dataset(dataset: Any, cfg: EncodeConfig, store: shards.OutputStore, name: str) -> str:
    """Write a Ray Dataset's corpus columns once, by the workers, as parquet named by write
    task (the same dataset gives the same files, so a rerun can reuse its shards)."""
    from ray.data.datasource import FilenameProvider

    class ByTask(FilenameProvider):
        def get_filename_for_block(self, block: Any, write_uuid: str, task_index: int, block_index: int) -> str:
            return f"input-{task_index:06d}-{block_index:06d}.parquet"

    missing = [c for c in needed_columns(cfg.corpus) if c not in (dataset.columns() or [])]
    if missing:
        raise DataError(
            f"the dataset has no column(s) {missing}; its columns are {dataset.columns()}. "
            "Set corpus.id_column / text_column / title_column"
        )
    store.delete(name)
    location = store.describe(name)
    dataset.select_columns(needed_columns(cfg.corpus)).write_parquet(location, filename_provider=ByTask())
    return location


def _run_pipeline(
    cfg: EncodeConfig,
    outputs: list[OutputSpec],
    specs: list[ShardSpec],
    duplicates: Duplicates,
    store: shards.OutputStore,
    fingerprint: str,
) -> dict[int, dict[str, Any]]:
    """Every shard through read+tokenize and encode+write; returns each shard's sidecar facts."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from raytrieve.inference.checks import raise_worker_error
    from raytrieve.inference.stages import EncodeAndWrite, ReadAndTokenize
    from raytrieve.sizing import cluster_shape, default_encode_actors

    c = cfg.compute
    use_gpu = c.device == "cuda" or (c.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    if c.device == "cuda" and ray.cluster_resources().get("GPU", 0) == 0:
        raise ConfigError("compute.device is cuda but the Ray cluster has no GPU; use auto or cpu")
    threads = c.torch_threads or max(1, int(c.cpus_per_encode_actor))
    actors = c.encode_actors or default_encode_actors(cluster_shape(), c, use_gpu, len(specs))
    log.info("%d encode actor(s) of %g CPU(s), %d torch thread(s) each", actors, c.cpus_per_encode_actor, threads)
    rows = [s.as_row() for s in specs]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(
        ReadAndTokenize,
        fn_constructor_kwargs={
            "specs": outputs,
            "corpus": cfg.corpus,
            "store": store,
            "fingerprint": fingerprint,
            "duplicates": duplicates.blocks,
        },
        compute=ActorPoolStrategy(size=c.tokenize_actors),
        num_cpus=0.5,
        batch_size=1,
        batch_format="pyarrow",
    )
    ds = ds.map_batches(
        EncodeAndWrite,
        fn_constructor_kwargs={
            "specs": outputs,
            "store": store,
            "fingerprint": fingerprint,
            "device": "cuda" if use_gpu else "cpu",
            "threads": threads,
            "token_budget": c.token_budget,
            "max_batch_size": c.max_batch_size,
        },
        compute=ActorPoolStrategy(size=actors),
        num_cpus=c.cpus_per_encode_actor,
        num_gpus=1 if use_gpu else 0,
        batch_size=1,
        batch_format="pyarrow",
        # torch sizes its thread pool from OMP_NUM_THREADS at process start (Ray sets it from
        # the CPU share), so the actor's threads are set in its environment.
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}},
    )
    from raytrieve.progress import Stage

    done: dict[int, dict[str, Any]] = {}
    t0, encoded_rows = time.perf_counter(), 0
    bar = Stage("encode", total=len(specs), unit="shard")
    try:
        for row in ds.iter_rows():
            s = int(row["shard"])
            done[s] = dict(row)
            if row["previous"] == "same":
                bar.update(1, encoded_rows=encoded_rows)
                continue
            encoded_rows += int(row["rows"])
            bar.update(1, encoded_rows=encoded_rows)
            log.debug(  # the stage's bar or lines are the progress a person reads
                "shard %d written by node %s (%d rows, encoded in %.2fs; %d/%d shards; %.1f rows/s overall)",
                s,
                str(row["node"])[:12],
                row["rows"],
                row["encode_s"],
                len(done),
                len(specs),
                encoded_rows / max(time.perf_counter() - t0, 1e-9),
            )
    except Exception as e:  # a Ray task failure: finished shards stay for the rerun
        raise_worker_error(e)
        raise EncodeJobError(
            f"encoding failed ({e}); finished shards are kept in {store.describe()}: run the job again to resume"
        ) from e
    finally:
        bar.close()
    return done
