"""The corpus encoding job: corpus -> tokenize (CPU actors) -> encode (actor pool, a GPU each
when the cluster has GPUs) -> parquet shards + manifest.

    result = run_encode(load_encode_config("jobs/configs/encode_pydocs.yaml"), ray_address="local")

The driver reads and checks the corpus, loads each model once to check the config against
it, and plans fixed shards. Ray Data then carries one row per unfinished shard through two
actor pools: tokenizers (half a CPU each) and encoders, which sort the shard's texts by
length and batch them by a token budget. The driver writes each shard as it arrives
(shards.py), so only the driver needs to see the output folder. A rerun skips every
finished shard; a finished job run again is a no-op.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raytrieve import _io
from raytrieve._io import pack_arrays, unpack_arrays
from raytrieve.errors import ConfigError, DataError, RaytrieveError
from raytrieve.inference import shards
from raytrieve.inference.config import EncodeConfig
from raytrieve.inference.corpus import Corpus, content_fingerprint, read_corpus, shard_bounds

log = logging.getLogger("raytrieve.encode")


class EncodeJobError(RaytrieveError):
    """The encoding job started but did not finish; finished shards are kept for a rerun."""


@dataclass
class OutputSpec:
    """One model's part of the job, resolved on the driver (plain data: it travels to actors)."""

    kind: str  # "dense" | "sparse"
    model_path: str
    task: str  # Router route / prompt side
    prompt: str | None
    max_seq_length: int | None
    trust_remote_code: bool
    # dense
    precision: str = "float32"
    truncate_dim: int | None = None
    normalize: bool = False
    ranges: list[list[float]] | None = None
    # sparse
    max_active_dims: int | None = None


@dataclass
class EncodeResult:
    output_dir: str
    rows: int
    shards: int
    shards_written: int
    shards_reused: int
    bad_rows: int
    seconds: float
    rows_per_s: float
    already_complete: bool


def load_model(spec: OutputSpec, device: str = "cpu") -> Any:
    from raytrieve.encoders import load_encoder

    return load_encoder(spec.kind, spec.model_path, device=device, max_seq_length=spec.max_seq_length,
                        trust_remote_code=spec.trust_remote_code)


class TokenizeShards:
    """Ray Data callable: a shard's texts -> each model's token ids, flattened with offsets."""

    def __init__(self, specs: list[OutputSpec]) -> None:
        import torch

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(1)
        self.specs = specs
        self.modules = [load_model(s).input_module(s.task) for s in specs]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        blobs = []
        for payload in batch["payload"]:
            texts = json.loads(payload)
            arrays: dict[str, np.ndarray] = {}
            for m, (spec, module) in enumerate(zip(self.specs, self.modules)):
                encoded = module.tokenize_ids(texts, prompt=spec.prompt)
                lengths = np.fromiter((len(x) for x in encoded["input_ids"]), np.int64, len(texts))
                arrays[f"{m}.offsets"] = np.concatenate(([0], np.cumsum(lengths)))
                for key, rows in encoded.items():
                    arrays[f"{m}.{key}"] = np.fromiter((t for row in rows for t in row), np.int64)
            blobs.append(pack_arrays(arrays))
        return {"shard": batch["shard"], "tokens": np.array(blobs, dtype=object)}


def _split(flat: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    return [flat[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


class EncodeShards:
    """Ray Data callable: token ids -> vectors (length-sorted, token-budget batches)."""

    def __init__(self, specs: list[OutputSpec], device: str, threads: int, token_budget: int,
                 max_batch_size: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.specs, self.token_budget, self.max_batch_size = specs, token_budget, max_batch_size
        self.models = [load_model(s, device) for s in specs]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        blobs, seconds = [], []
        for tokens in batch["tokens"]:
            t0 = time.perf_counter()
            blobs.append(pack_arrays(self.encode(unpack_arrays(tokens))))
            seconds.append(time.perf_counter() - t0)
        return {"shard": batch["shard"], "vectors": np.array(blobs, dtype=object), "encode_s": np.array(seconds)}

    def encode(self, tokens: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raytrieve.encoders.base import Pretokenized

        out: dict[str, np.ndarray] = {}
        for m, (spec, model) in enumerate(zip(self.specs, self.models)):
            offsets = tokens[f"{m}.offsets"]
            encoded = {k.split(".", 1)[1]: _split(v, offsets) for k, v in tokens.items()
                       if k.startswith(f"{m}.") and not k.endswith(".offsets")}
            common = dict(prompt=spec.prompt, task=spec.task, batch_size=self.max_batch_size,
                          token_budget=self.token_budget, show_progress_bar=False)
            if spec.kind == "dense":
                out["dense"] = dense_output(model.encode(Pretokenized(encoded), truncate_dim=spec.truncate_dim,
                                                         normalize_embeddings=spec.normalize, **common), spec)
            else:
                emb = model.encode(Pretokenized(encoded), max_active_dims=spec.max_active_dims, **common)
                out["sparse_offsets"], out["sparse_indices"], out["sparse_values"] = sparse_csr(emb)
        return out


def dense_output(emb: np.ndarray, spec: OutputSpec) -> np.ndarray:
    from raytrieve.encoders.quantization import quantize_embeddings

    if spec.precision == "float16":
        return emb.astype(np.float16)
    if spec.precision == "int8":
        return quantize_embeddings(emb, "int8", ranges=np.asarray(spec.ranges, dtype=np.float32))
    if spec.precision == "binary":
        return quantize_embeddings(emb, "ubinary")
    return emb.astype(np.float32)


def sparse_csr(emb: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sparse COO batch -> (offsets, indices, values), each row by weight descending."""
    from raytrieve.encoders.sparse import sparse_rows

    rows = sparse_rows(emb)
    lengths = np.fromiter((len(r["indices"]) for r in rows), np.int64, len(rows))
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    if not rows:
        return offsets, np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (offsets, np.concatenate([r["indices"] for r in rows]),
            np.concatenate([r["values"] for r in rows]).astype(np.float32))


# -- driver ------------------------------------------------------------------------------------

def resolve_outputs(cfg: EncodeConfig, corpus: Corpus, where: str) -> tuple[list[OutputSpec], dict[str, Any]]:
    """Each model loaded once on the driver: the config is checked against it (prompt names,
    truncate_dim), prompts resolved, and int8 ranges calibrated. Returns the specs and what the
    manifest says of each model."""
    from raytrieve import assets
    from raytrieve.encoders.quantization import quantization_ranges

    specs, described = [], {}
    for kind, out in (("dense", cfg.dense), ("sparse", cfg.sparse)):
        if out is None:
            continue
        try:
            path = str(assets.resolve_model(out.model))
        except RaytrieveError as e:
            raise ConfigError(f"{where}.{kind}.model: {e}") from None
        spec = OutputSpec(kind, path, cfg.side, None, out.max_seq_length, out.trust_remote_code)
        model = load_model(spec)
        try:
            spec.prompt = model.resolve_prompt(out.prompt, out.prompt_name or (
                None if out.prompt is not None else model.prompt_name_for(cfg.side)))
        except RaytrieveError as e:
            raise ConfigError(f"{where}.{kind}: {e}") from None
        info: dict[str, Any] = {"model": out.model, "model_path": path, "prompt": spec.prompt,
                                "max_seq_length": model.max_seq_length, "similarity": model.similarity_fn_name}
        if kind == "dense":
            dim = model.get_embedding_dimension()
            if out.truncate_dim is not None and dim is not None and out.truncate_dim > dim:
                raise ConfigError(f"{where}.dense.truncate_dim={out.truncate_dim} exceeds the model's {dim} dimensions")
            spec.precision, spec.truncate_dim = out.precision, out.truncate_dim
            spec.normalize = out.normalize if out.normalize is not None else model.similarity_fn_name == "cosine"
            if out.precision == "int8":
                step = max(1, len(corpus) // out.calibration_rows)
                sample = corpus.texts[::step][: out.calibration_rows]
                emb = model.encode(sample, task=cfg.side, prompt=spec.prompt, truncate_dim=out.truncate_dim,
                                   normalize_embeddings=spec.normalize)
                if len(sample) < 2:
                    raise DataError(f"{where}.dense.precision int8 needs at least 2 corpus rows to calibrate")
                spec.ranges = quantization_ranges(emb).tolist()
            info.update(dim=out.truncate_dim or dim, precision=out.precision, truncate_dim=out.truncate_dim,
                        normalize=spec.normalize, ranges=spec.ranges)
        else:
            spec.max_active_dims = out.max_active_dims
            info.update(vocab_size=model.get_embedding_dimension() or model.input_module(cfg.side).get_embedding_dimension(),
                        max_active_dims=out.max_active_dims)
        specs.append(spec)
        described[kind] = info
        del model
    return specs, described


def _fingerprint(cfg: EncodeConfig, corpus: Corpus, described: dict[str, Any]) -> str:
    import hashlib

    from raytrieve import assets

    models = {k: {**v, "weights": assets._fingerprint(Path(v["model_path"]))} for k, v in described.items()}
    # Hashing every text is the encoding job's business only (it decides what a rerun may reuse),
    # so it happens here, not when a corpus is read.
    blob = json.dumps({"corpus": content_fingerprint(corpus.ids, corpus.texts), "side": cfg.side, "rows_per_shard": cfg.rows_per_shard,
                       "models": models}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _claim_output(out: Path, fingerprint: str, where: str) -> None:
    """Refuse to mix two different jobs in one folder; never touch a folder that is not ours."""
    job = out / shards.JOB
    if job.exists():
        previous = shards.read_json(job).get("fingerprint")
        if previous != fingerprint:
            raise ConfigError(
                f"{where}.output_dir {out}: holds the output of a different encoding job (other corpus, model or "
                "settings); choose a new output_dir or delete that folder"
            )
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{where}.output_dir {out}: exists and is not an encoding job's folder; choose another")


def run_encode(cfg: EncodeConfig, where: str = "config", ray_address: str | None = None) -> EncodeResult:
    """Encode ``cfg.corpus`` as the config says. ``ray_address``: None joins the cluster this
    job runs on (``ray job submit``), "local" starts an embedded Ray."""
    start = time.perf_counter()
    cfg.check(where)
    corpus = read_corpus(cfg.corpus, cfg.bad_rows)
    if len(corpus.bad):
        log.warning("%d bad row(s) left out (bad_rows: skip); listed in %s", len(corpus.bad), shards.BAD_ROWS)
    specs, described = resolve_outputs(cfg, corpus, where)
    fingerprint = _fingerprint(cfg, corpus, described)
    out = Path(cfg.output_dir).expanduser()
    _claim_output(out, fingerprint, where)
    bounds = shard_bounds(len(corpus), cfg.rows_per_shard)

    manifest_path = out / shards.MANIFEST
    if manifest_path.exists() and shards.read_json(manifest_path).get("fingerprint") == fingerprint:
        if all(shards.finished_shard(out, s, b - a, fingerprint) for s, (a, b) in enumerate(bounds)):
            log.info("%s: already complete (%d rows in %d shards); nothing to do", out, len(corpus), len(bounds))
            return EncodeResult(str(out), len(corpus), len(bounds), 0, len(bounds), len(corpus.bad),
                                round(time.perf_counter() - start, 3), 0.0, True)
        manifest_path.unlink()  # a shard changed since: redo it, then write the manifest again

    out.mkdir(parents=True, exist_ok=True)
    _io.write_json(out / shards.JOB, {"fingerprint": fingerprint, "config": asdict(cfg)})
    shards.remove_temporaries(out)
    done = {s: shards.finished_shard(out, s, b - a, fingerprint) for s, (a, b) in enumerate(bounds)}
    todo = [s for s, sidecar in done.items() if sidecar is None]
    if len(todo) < len(bounds):
        log.info("resuming: %d of %d shards already finished", len(bounds) - len(todo), len(bounds))

    encode_start = time.perf_counter()
    if todo:
        for s, sidecar in _run_pipeline(cfg, specs, corpus, bounds, todo, out, fingerprint, ray_address):
            done[s] = sidecar
    seconds = time.perf_counter() - encode_start
    rows_written = sum(bounds[s][1] - bounds[s][0] for s in todo)

    import pyarrow.parquet as pq

    with _io.atomic_file(out / shards.BAD_ROWS) as tmp:
        pq.write_table(corpus.bad, tmp)
    _io.write_json(manifest_path, {
        "format": shards.FORMAT, "version": 1, "fingerprint": fingerprint,
        "corpus": {"path": str(Path(cfg.corpus.path).expanduser().resolve()), "input_rows": corpus.input_rows, "bad_rows": len(corpus.bad),
                   "id_column": cfg.corpus.id_column, "text_column": cfg.corpus.text_column,
                   "title_column": cfg.corpus.title_column, "title_separator": cfg.corpus.title_separator},
        "rows": len(corpus), "side": cfg.side, **described,
        "shards": [{"file": done[s]["file"], "rows": done[s]["rows"], "sha256": done[s]["sha256"]}
                   for s in range(len(bounds))],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    result = EncodeResult(str(out), len(corpus), len(bounds), len(todo), len(bounds) - len(todo), len(corpus.bad),
                          round(time.perf_counter() - start, 3), round(rows_written / max(seconds, 1e-9), 2), False)
    log.info("encoded %d rows (%d new shards, %d reused) at %.1f rows/s into %s", result.rows, result.shards_written,
             result.shards_reused, result.rows_per_s, out)
    return result


def _run_pipeline(cfg: EncodeConfig, specs: list[OutputSpec], corpus: Corpus, bounds: list[tuple[int, int]],
                  todo: list[int], out: Path, fingerprint: str, ray_address: str | None):
    """Yield (shard, sidecar) as each shard is encoded and written."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    if not ray.is_initialized():
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        ray.init(address=ray_address)
    c = cfg.compute
    use_gpu = c.device == "cuda" or (c.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    if c.device == "cuda" and ray.cluster_resources().get("GPU", 0) == 0:
        raise ConfigError("compute.device is cuda but the Ray cluster has no GPU; use auto or cpu")
    threads = c.torch_threads or max(1, int(c.cpus_per_encode_actor))
    rows = [{"shard": s, "payload": json.dumps(corpus.texts[bounds[s][0]: bounds[s][1]])} for s in todo]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(TokenizeShards, fn_constructor_kwargs={"specs": specs},
                        compute=ActorPoolStrategy(size=c.tokenize_actors), num_cpus=0.5, batch_size=1,
                        batch_format="numpy")
    ds = ds.map_batches(
        EncodeShards,
        fn_constructor_kwargs={"specs": specs, "device": "cuda" if use_gpu else "cpu", "threads": threads,
                               "token_budget": c.token_budget, "max_batch_size": c.max_batch_size},
        compute=ActorPoolStrategy(size=c.encode_actors), num_cpus=c.cpus_per_encode_actor,
        num_gpus=1 if use_gpu else 0, batch_size=1, batch_format="numpy",
        # torch sizes its thread pool from OMP_NUM_THREADS at process start (Ray sets it from
        # the CPU share), so the actor's threads are set in its environment.
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}},
    )
    total, encoded_rows = len(todo), 0
    t0 = time.perf_counter()
    try:
        for n, row in enumerate(ds.iter_rows(), 1):
            s = int(row["shard"])
            a, b = bounds[s]
            encoded_rows += b - a
            vectors = unpack_arrays(row["vectors"])
            sparse = None
            if "sparse_offsets" in vectors:
                sparse = (vectors["sparse_offsets"], vectors["sparse_indices"], vectors["sparse_values"])
            table = shards.shard_table(corpus.ids[a:b], vectors.get("dense"), sparse)
            sidecar = shards.write_shard(out, s, table, fingerprint)
            elapsed = time.perf_counter() - t0
            log.info("shard %d done (%d/%d this run, %d rows, encoded in %.2fs; %.1f rows/s overall)", s, n, total,
                     b - a, float(row["encode_s"]), encoded_rows / max(elapsed, 1e-9))
            yield s, sidecar
    except RaytrieveError:
        raise
    except Exception as e:  # a Ray task failure: finished shards stay for the rerun
        raise EncodeJobError(f"encoding failed ({e}); finished shards are kept in {out}: run the job again "
                             "to resume") from e
