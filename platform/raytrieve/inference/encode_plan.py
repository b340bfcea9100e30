"""What the encoding job's driver settles before any Ray work: each model loaded once to check
the config against it and describe it for the manifest, int8 ranges calibrated on a bounded
sample, the job's identity and fingerprint, and whether ``output_dir`` may be written.
The job itself (the Ray Data pipeline and the commit) is in encode.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from raytrieve._io import mark_used, redact
from raytrieve.config import added_settings_at_default, differences, only_added_at_default
from raytrieve.data.sources import ShardSpec, Source, read_shard
from raytrieve.errors import ConfigError, DataError, RaytrieveError
from raytrieve.inference import shards
from raytrieve.inference.config import DenseOutputConfig, EncodeConfig
from raytrieve.inference.corpus import needed_columns, shard_rows
from raytrieve.inference.stages import OutputSpec

log = logging.getLogger("raytrieve.encode")

# Shards sampled (evenly spaced) for int8 calibration: the driver reads at most these.
CALIBRATION_SHARDS = 8
# Where a Ray Dataset handed to run_encode is written first, inside output_dir.
STAGED_INPUT = "_input"
STAGED_NEXT = "_input.next"  # a dataset staged beside the input until the run is known to be this job's
# The length of a model key under the older rules (assets.fingerprint, top_level_fingerprint):
# their folders' keys tell a refusal that the model was keyed by mtimes, not content.
OLDER_KEY_LENGTH = 12


def load_model(spec: OutputSpec, device: str = "cpu") -> Any:
    from raytrieve.encoders import load_encoder

    return load_encoder(
        spec.kind,
        spec.model_path,
        device=device,
        max_seq_length=spec.max_seq_length,
        trust_remote_code=spec.trust_remote_code,
    )  # float32: the driver only checks the config and calibrates int8 ranges


def resolve_outputs(cfg: EncodeConfig, sample: list[str], where: str) -> tuple[list[OutputSpec], dict[str, Any]]:
    """Each model loaded once on the driver: the config is checked against it (prompt names,
    truncate_dim), prompts resolved, and int8 ranges calibrated on ``sample``. Returns the
    specs and what the manifest says of each model."""
    from raytrieve.model_ref import files_key, resolve_field

    # Every reference resolved first: a wrong name or URI is reported before torch loads.
    outputs = [(kind, out) for kind, out in (("dense", cfg.dense), ("sparse", cfg.sparse)) if out is not None]
    paths = {kind: str(resolve_field(out.model, f"{where}.{kind}.model")) for kind, out in outputs}
    from raytrieve.kinds import refuse_other_kind

    for kind, out in outputs:  # another kind loads as this one: wrong vectors, or a failure in every actor
        refuse_other_kind(paths[kind], kind, f"{where}.{kind}.model: {redact(out.model)}", f"name a {kind} model there")

    from raytrieve.encoders.base import recorded_prompt
    from raytrieve.encoders.tokenizer_only import InputTokenizer
    from raytrieve.quantization import quantization_ranges

    specs, described = [], {}
    for kind, out in outputs:
        path = paths[kind]
        spec = OutputSpec(kind, path, cfg.side, None, out.max_seq_length, out.trust_remote_code, out.dtype)
        model = load_model(spec)
        try:
            spec.prompt = model.resolve_prompt(
                out.prompt, out.prompt_name or (None if out.prompt is not None else model.prompt_name_for(cfg.side))
            )
        except RaytrieveError as e:
            raise ConfigError(f"{where}.{kind}: {e}") from None
        # Taken from the loaded model, so that the tokenizer actors need neither transformers nor torch.
        spec.tokenizer = InputTokenizer.of_module(model.input_module(spec.task)).portable()
        info: dict[str, Any] = {
            "model": out.model,
            "model_path": path,
            "prompt": recorded_prompt(spec.prompt),
            "max_seq_length": model.max_seq_length,
            "similarity": model.similarity_fn_name,
            "dtype": out.dtype,  # asked for; the manifest's dtypes_used says what the actors chose
            # Its files' content: the job's identity, and what Serve, evaluate and mining compare
            # the model they are given with (ModelInfo.made_by), on any machine.
            "weights": files_key(out.model, Path(path)),
        }
        if isinstance(out, DenseOutputConfig):  # kind "dense"; else SparseOutputConfig
            dim = model.get_embedding_dimension()
            if out.truncate_dim is not None and dim is not None and out.truncate_dim > dim:
                raise ConfigError(f"{where}.dense.truncate_dim={out.truncate_dim} exceeds the model's {dim} dimensions")
            spec.precision, spec.truncate_dim = out.precision, out.truncate_dim
            spec.normalize = out.normalize if out.normalize is not None else model.similarity_fn_name == "cosine"
            if out.precision == "int8":
                if len(sample) < 2:
                    raise DataError(f"{where}.dense.precision int8 needs at least 2 corpus rows to calibrate")
                emb = model.encode(
                    sample,
                    task=cfg.side,
                    prompt=spec.prompt,
                    truncate_dim=out.truncate_dim,
                    normalize_embeddings=spec.normalize,
                )
                spec.ranges = quantization_ranges(emb).tolist()
            info.update(
                dim=out.truncate_dim or dim,
                precision=out.precision,
                truncate_dim=out.truncate_dim,
                normalize=spec.normalize,
                ranges=spec.ranges,
            )
        else:
            spec.max_active_dims = out.max_active_dims
            info.update(
                vocab_size=model.get_embedding_dimension() or model.input_module(cfg.side).get_embedding_dimension(),
                max_active_dims=out.max_active_dims,
            )
        specs.append(spec)
        described[kind] = info
        del model
    return specs, described


def calibration_sample(cfg: EncodeConfig, specs: list[ShardSpec]) -> list[str]:
    """Evenly spaced texts from a few evenly spaced shards: bounded by a few shards, whatever
    the corpus size."""
    if cfg.dense is None or cfg.dense.precision != "int8":
        return []
    want = cfg.dense.calibration_rows
    picked = [
        specs[round(i * (len(specs) - 1) / max(1, CALIBRATION_SHARDS - 1))]
        for i in range(min(CALIBRATION_SHARDS, len(specs)))
    ]
    picked = list({s.shard: s for s in picked}.values())
    texts: list[str] = []
    for spec in picked:
        rows = shard_rows(read_shard(spec, needed_columns(cfg.corpus)), cfg.corpus, spec.path)
        take = max(1, want // len(picked))
        step = max(1, len(rows.texts) // take)
        texts += rows.texts[::step][:take]
    return texts[:want]


TITLE_RULE = "the title alone when the text is blank"
# What the manifest says of a model but its job's identity leaves out: int8 ranges (calibrated on
# the corpus, kept from the first run) and this machine's copy of the model.
MACHINE_FIELDS = ("ranges", "model_path")


def job_identity(
    cfg: EncodeConfig, source: Source, described: dict[str, Any], location: str | None = None
) -> dict[str, Any]:
    """What a rerun must share with the output it finds: settings, models and the shard plan
    (as JSON values: job.json keeps it, so a refusal can say what differs). The corpus
    *content* is not in it: each shard carries its own content checksum. ``location``: where the
    corpus will be read from, when that is not where ``source`` is now (a staged dataset).

    Adding a corpus or job setting: its default must encode as jobs before it did. A folder
    written before it existed then resumes while the setting is at its default (``claim_output``,
    ``config.only_added_at_default``); a default that changed the vectors would resume wrong ones."""
    # int8 ranges are calibrated on the corpus itself: they are kept from the job's first run
    # (job.json), not part of what makes two runs the same job. dtype float32 is what every job
    # before the dtype setting computed in, so it is left out: their folders still resume.
    # The model is its reference without keys and its files' content ("weights"): where this machine keeps
    # its copy (model_path: a cache folder for a store or MLflow URI, the checkout for a shipped
    # variant) and the keys a URI holds (redact: user info, secret query values) are no part of
    # the job, so a job resumed on another machine, with another cache, or with a rotated secret
    # finds its model the same.
    models = {k: _model_part(v) for k, v in described.items()}
    body = {
        "shard_format": shards.SHARD_FORMAT,
        "corpus": {**cfg.corpus.model_dump(mode="json"), "path": location or source.location, "format": source.format},
        "side": cfg.side,
        "rows_per_shard": cfg.rows_per_shard,
        "bad_rows": cfg.bad_rows,
        "check_duplicate_ids": cfg.check_duplicate_ids,
        "models": models,
    }
    if cfg.corpus.title_column:
        # How a row's title and text become its one text (corpus.join_title). Jobs before this
        # key left out a row with a title and a blank text; they must not resume under this rule.
        body["title_rule"] = TITLE_RULE
    return json.loads(json.dumps(body, sort_keys=True, default=str))


def job_fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def claim_output(
    store: shards.OutputStore,
    identity: dict[str, Any] | None,
    where: str,
    scratch: bool = False,
    cfg: EncodeConfig | None = None,
    described: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Refuse to mix two different jobs in one folder; never touch a folder that is not ours.
    Returns the identity the folder is this job's under: ``identity``, or for a folder of an
    earlier raytrieve whose identity held each model's local folder and URI keys, or keyed its
    models by another rule, the folder's own identity (``older_identity_rules``: needs
    ``described``, as ``resolve_outputs`` gave it), so that its shards are reused; or for a folder
    of an earlier raytrieve that lacked settings ``cfg`` holds at their defaults
    (``config.added_settings_at_default``: a new setting's default encodes as jobs before it did),
    or at the values the folder's job.json "config" held them at (an earlier raytrieve that had
    them but left them out of the identity), the folder's own identity.
    ``identity`` None: only the second check (a file is refused either way). ``scratch``: the
    folder is the caller's own cache (mine's ``<output_path>.work/vectors``), so another job's
    output in it is replaced, not refused: the user never named that folder, and no advice about
    it could be followed."""
    if store.exists() and not store.is_folder():
        raise ConfigError(
            f"{where}.output_dir {store.describe()}: is a file; name a folder (the job writes shards in it)"
        )
    if store.exists(shards.JOB) and identity is not None:
        job = store.read_json(shards.JOB)
        if job.get("fingerprint") != job_fingerprint(identity):
            olders = older_identity_rules(identity, described) if described is not None else []
            for rule, older in olders:
                if job.get("fingerprint") == job_fingerprint(older):
                    log.info("%s: an encoding job of an earlier raytrieve (models keyed by %s)", store.describe(), rule)
                    return older
            kept = job.get("identity")
            # The job's whole config, kept beside its identity: a setting the identity lacks but
            # the config held otherwise was set, whatever the identity says.
            held = job.get("config")
            intact = isinstance(kept, dict) and job.get("fingerprint") == job_fingerprint(kept)
            # A folder whose identity named where its machine kept each model (an earlier
            # raytrieve) is compared without that: the same content elsewhere is the same job.
            plain = without_machine_fields(kept) if isinstance(kept, dict) else kept
            if intact and plain == identity:
                log.info(
                    "%s: an encoding job of an earlier raytrieve (models named by their local folder)", store.describe()
                )
                return kept
            if cfg is not None and intact:
                pairs = [(plain, identity), *((kept, older) for _, older in olders)]
                for held_as, candidate in pairs:
                    if only_added_at_default(held_as, candidate, cfg, held):
                        added = sorted(added_settings_at_default(held_as, candidate, cfg, held))
                        log.info("%s: an encoding job of an earlier raytrieve, before %s", store.describe(), added)
                        return kept
            # An earlier raytrieve's folder is told apart by what differs under its own rule: its
            # models' keys always differ from this rule's, which would name a change nobody made.
            kept_models = (kept.get("models") or {}) if isinstance(kept, dict) else {}
            old_keys = [
                (rule, older)
                for rule, older in olders
                if rule in (CONVERTED_RULE, *MTIME_RULES)
                and all(kept_models.get(k, {}).get("weights") == v["weights"] for k, v in older["models"].items())
            ]
            compared, basis = (plain, identity)
            if old_keys:
                # The converted-files rule wrote no local folder: a folder of an earlier rule that
                # did (kept's model_path) is compared without it, as this rule compares.
                rule, older = old_keys[0]
                compared, basis = (plain, older) if rule == CONVERTED_RULE else (kept, older)
            ignore = added_settings_at_default(compared, basis, cfg, held) if cfg is not None else set()
            differs = redact(differences(compared, basis, ignore=ignore, held=held))  # a corpus URI's keys
            what = f"that job -> this one: {differs}" if differs else "other corpus location, model or settings"
            if scratch:
                log.info("%s: made by other settings (%s); encoding again", store.describe(), what)
                # job.json last: a run killed in between still finds the old job and replaces it
                # This run's staged dataset stays (swapped in after the checks); an old input goes.
                kept = (shards.JOB, STAGED_NEXT)
                for name in [n for n in store.names() if n not in kept] + [shards.JOB]:
                    store.delete(name)
                return identity
            # A folder from before the dtype setting computed in float32 (its identity has no dtype).
            older = "; it computed in float32: set dtype: float32 to resume it" if "dtype: None ->" in what else ""
            if (
                ".weights: " in what
                and kept_models
                and all(len(str(m.get("weights"))) == OLDER_KEY_LENGTH for m in kept_models.values())
            ):
                older += (
                    "; that job keyed its models by their files' modification times (an earlier raytrieve), so a file "
                    "replaced since, even by a copy of the same content, counts as a change there"
                )
            elif ".weights: " in what:
                older += "; a file under the model's folder was added, removed or changed since that job"
            if "title_rule: None ->" in what:
                older += (
                    "; it left out rows with a title and a blank text, which are now encoded as their title alone, "
                    "so its shards cannot be completed under this rule"
                )
            raise ConfigError(
                f"{where}.output_dir {store.describe()}: holds the output of a different encoding job ({what}){older}; "
                "run it with that job's settings, choose a new output_dir or delete that folder"
            )
    elif not store.exists(shards.JOB) and [n for n in store.names() if n not in (STAGED_INPUT, STAGED_NEXT)]:
        raise ConfigError(
            f"{where}.output_dir {store.describe()}: exists and is not an encoding job's folder; choose another"
        )
    return identity


def _model_part(model: dict[str, Any]) -> dict[str, Any]:
    """A model's part of the identity, from what the manifest says of it (``resolve_outputs``)
    or from an identity an earlier raytrieve wrote (with ``model_path`` and the URI's keys)."""
    part = {f: x for f, x in model.items() if f not in MACHINE_FIELDS and not (f == "dtype" and x == "float32")}
    return {**part, "model": redact(model["model"])} if "model" in model else part


def without_machine_fields(identity: dict[str, Any]) -> dict[str, Any]:
    """An identity as ``job_identity`` writes it now, from one an earlier raytrieve wrote with
    each model's local folder (``model_path``) and its reference with keys."""
    models = identity.get("models")
    if not isinstance(models, dict):
        return identity
    return {**identity, "models": {k: _model_part(v) if isinstance(v, dict) else v for k, v in models.items()}}


# older_identity_rules' names of the rules that keyed model files by their mtimes: a refusal of
# such a folder says so (a copy of the same content counts as a change there).
MTIME_RULES = ("every file's path, size and mtime", "top-level files")
# The rule that keyed a converted variant by its converted files (before converted_variant_key).
CONVERTED_RULE = "a converted variant's files by their content"


def older_identity_rules(identity: dict[str, Any], described: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``identity`` as earlier raytrieve versions wrote it, newest first: a variant converted on
    first use keyed by the converted files' content (until 2026-12-06; the rule given only when
    the job has such a model); then each model named by its reference as given (keys and all) and
    its local folder (``model_path``; a converted variant's cache folder as it was named then),
    its files keyed by their content, then by every file's
    path, size and mtime (``assets.fingerprint``), then by the top-level files alone
    (``assets.top_level_fingerprint``): ``MTIME_RULES``. Folders written under them still resume;
    a change those rules could not see (the top-level rule: a subfolder's) goes unseen there, as
    it did when the folder was written, and a new mtime on the same content still refuses the
    mtime rules' folders."""
    from raytrieve import assets
    from raytrieve.model_ref import converted_variant

    # A converted variant's converted files by content (every other model's key is its files'
    # content already: files_key), in its cache folder as those rules named it, where this
    # machine still has that copy (the conversion those jobs used; today's may record other
    # library versions), else in today's.
    variants = {k: converted_variant(described[k]["model"]) for k in identity["models"]}
    paths = {
        k: str(assets.converted_folder(variant, legacy=True)) if variant else described[k]["model_path"]
        for k, variant in variants.items()
    }
    local = {k: Path(p) if Path(p).is_dir() else Path(described[k]["model_path"]) for k, p in paths.items()}
    for k, variant in variants.items():
        if variant and local[k] == Path(paths[k]):
            # Read to key that job: a use, so that `raytrieve cache prune` keeps the copy while
            # such a folder is resumed (without it, the folder is refused: encoded again).
            mark_used(local[k])
    contents = {k: assets.content_fingerprint(local[k]) if variant else None for k, variant in variants.items()}

    def by_content(k: str, v: dict[str, Any]) -> dict[str, Any]:
        return {**v, "weights": contents[k] or v["weights"]}

    def as_written(k: str, v: dict[str, Any], key: Any) -> dict[str, Any]:
        return {
            **by_content(k, v),
            "model": described[k]["model"],
            "model_path": paths[k],
            **({"weights": key(local[k])} if key else {}),
        }

    rules: list[tuple[str, dict[str, Any]]] = []
    if any(contents.values()):
        models = {k: by_content(k, v) for k, v in identity["models"].items()}
        rules.append((CONVERTED_RULE, {**identity, "models": models}))
    for name, key in (
        ("their content and local folder", None),
        (MTIME_RULES[0], assets.fingerprint),
        (MTIME_RULES[1], assets.top_level_fingerprint),
    ):
        rules.append((name, {**identity, "models": {k: as_written(k, v, key) for k, v in identity["models"].items()}}))
    return rules


def reuse_ranges(job: dict[str, Any], outputs: list[OutputSpec], described: dict[str, Any]) -> None:
    """A rerun quantizes with the int8 ranges of the job's first run (job.json), so that every
    shard of the job, reused or new, shares them."""
    for o in outputs:
        kept = (job.get("ranges") or {}).get(o.kind)
        if kept is not None and o.ranges is not None:
            o.ranges = described[o.kind]["ranges"] = kept
