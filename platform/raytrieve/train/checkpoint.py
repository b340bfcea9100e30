"""A training checkpoint: its layout, writing and reporting it, restoring the latest one, the
final model, and the folder a run's checkpoints live in.

A checkpoint is a directory, reported through ``ray.train.report`` as ``step-00000012``:

    model/            the encoder in sentence-transformers format, loadable as is (rank 0)
    state.pt          optimizer, schedule, step and loss heads; tensors only, so it is read
                      with ``weights_only=True`` (rank 0)
    rng-<rank>.json   each rank's Python and torch random state, its GPU's too (every rank)

Every rank's files land in that one directory, and Ray Train registers it only once every rank
has reported, keeping the newest ``checkpoint.keep`` under ``checkpoint_dir(cfg)/run``. A restarted
worker group is handed the newest registered one by ``ray.train.get_checkpoint``, so a
checkpoint cut short by a crash is never restored: there is no scan of the folder here.

Under FSDP the weights and optimizer state are gathered to full tensors before rank 0 writes
them and scattered back into the shards on restore, so every rank takes part in ``save``,
``restore_latest`` and ``save_model``.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from raytrieve._io import redact
from raytrieve.data.files import OutputStore, folder_with_suffix, is_uri
from raytrieve.errors import ConfigError
from raytrieve.train.distributed import is_fsdp

if TYPE_CHECKING:
    from raytrieve.train.config import TrainConfig
    from raytrieve.train.plan import Plan

MODEL = "model"
STATE = "state.pt"
RUN_STAMP = "raytrieve-run.json"


def _rng_file(rank: int) -> str:
    return f"rng-{rank}.json"


def checkpoint_dir(cfg: TrainConfig) -> str:
    """Ray Train's storage for the run: ``checkpoint.dir``, or ``<output_dir>.checkpoints``; a
    local path (resolved) or the URI of an object store (files.OutputStore reads and writes both)."""
    given = cfg.checkpoint.dir or folder_with_suffix(cfg.output_dir, ".checkpoints")  # beside the model
    return folder_with_suffix(given) if is_uri(given) else str(Path(given).resolve())


# Settings a resumed run may change: where things are written and tracked, how often it
# checkpoints and evaluates, how many threads compute. None of them changes what is trained.
_RESUMABLE = {
    "output_dir": None,
    "mlflow": None,
    "checkpoint": None,
    "eval": None,
    "scaling": {"torch_threads", "resources_per_worker", "placement_strategy"},
}


# What only says where a dataset lies and how its files are read: the data's own digest is in
# the identity, so the same rows moved, copied or converted (jsonl to parquet) resume. Stamps of
# the versions that kept ``format`` still resume (``_as_stamped_now``).
_WHERE_DATA_LIES = ("path", "format")


def run_identity(cfg: TrainConfig, plan: Plan, data: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the checkpoints it finds (as JSON values: the stamp
    keeps it, so a refusal can say what differs): the settings that change the training, the
    planned steps and micro-batches, and ``data`` (``run.training_data``: each dataset's rows and
    values' digest). Where the datasets lie and their files' format are not part of it: data moved,
    copied or converted resumes."""
    return _identity(cfg, plan, data, paths=False)


def older_run_identity(cfg: TrainConfig, plan: Plan, files: dict[str, Any]) -> dict[str, Any]:
    """The identity earlier raytrieve versions stamped: the datasets' paths in the settings, and
    ``files`` (``run.input_files``: each input file's size and modification time) as the data."""
    return _identity(cfg, plan, files, paths=True)


def _identity(cfg: TrainConfig, plan: Plan, data: dict[str, Any], paths: bool) -> dict[str, Any]:
    config = cfg.model_dump(mode="json")
    for key, inner in _RESUMABLE.items():
        if inner is None:
            config.pop(key, None)
        else:
            config[key] = {k: v for k, v in config.get(key, {}).items() if k not in inner}
    if not paths:
        config["datasets"] = _without_where_data_lies(config["datasets"])
    # Config keys at the top, so a refusal names them as the config does; "plan" and "data" are none of them.
    body = {**config, "plan": {"steps": plan.optimizer_steps, "micro_batches": plan.micro_batches}, "data": data}
    return json.loads(json.dumps(body, sort_keys=True, default=str))


def _fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _keyed_by_files(identity: Any) -> bool:
    """Whether a kept identity is ``older_run_identity``'s: its data maps files to [size, mtime]."""
    data = identity.get("data") if isinstance(identity, dict) else None
    return isinstance(data, dict) and any(isinstance(v, list) for v in data.values())


def _as_stamped_now(identity: Any) -> Any:
    """A kept identity as this version stamps it: without ``_WHERE_DATA_LIES`` (a stamp of the
    versions from before ``format`` left it keeps it). One keyed by files is left as it is."""
    if not isinstance(identity, dict) or _keyed_by_files(identity) or "datasets" not in identity:
        return identity
    return {**identity, "datasets": _without_where_data_lies(identity["datasets"] or [])}


def _without_where_data_lies(datasets: list[Any]) -> list[Any]:
    return [{k: v for k, v in d.items() if k not in _WHERE_DATA_LIES} if isinstance(d, dict) else d for d in datasets]


def _holds_checkpoints(store: OutputStore) -> bool:
    """Whether Ray Train registered a checkpoint of the run in ``store`` (a run stopped before
    its first one left nothing to resume, so a changed config may start there afresh)."""
    import pyarrow.fs as pafs

    if not store.exists("run"):
        return False
    found = store.fs.get_file_info(pafs.FileSelector(store.path("run")))
    return any(i.type == pafs.FileType.Directory and i.base_name.startswith("step-") for i in found)


def claim_checkpoint_dir(
    cfg: TrainConfig,
    plan: Plan,
    where: str,
    data: dict[str, Any],
    files: Callable[[], dict[str, Any]] | None = None,
) -> str:
    """``checkpoint_dir(cfg)``, stamped as this run's; a folder whose checkpoints belong to a run
    with other settings or data (they would resume the wrong training) is refused, naming what
    differs. ``data``: see ``run_identity``. ``files``: gives ``older_run_identity``'s files, asked
    only of a folder an earlier raytrieve stamped by them (listing a bucket's files costs a request
    each); that folder resumes while they are unchanged, and is stamped anew."""
    from raytrieve.config import added_settings_at_default, differences, only_added_at_default

    root = checkpoint_dir(cfg)
    store = OutputStore(root)
    identity = run_identity(cfg, plan, data)
    fingerprint = _fingerprint(identity)
    kept = store.read_json(RUN_STAMP) if store.exists(RUN_STAMP) else {}
    older = files is not None and _keyed_by_files(kept.get("identity"))
    now = files() if files is not None and older else {}
    theirs = older_run_identity(cfg, plan, now) if older else identity  # as the kept stamp keyed it
    # Settings a later raytrieve added, at their defaults, are no change: checkpoints resume
    # across such an upgrade (and are stamped anew).
    was = _as_stamped_now(kept.get("identity"))
    same = kept.get("fingerprint") == _fingerprint(theirs) or was == theirs or only_added_at_default(was, theirs, cfg)
    if kept and not same and _holds_checkpoints(store):
        added = added_settings_at_default(was, theirs, cfg)
        what = differences(was, theirs, ignore=added) or "config or data"
        why = (
            "; that run keyed its data by each file's size and modification time (an earlier raytrieve), so a "
            "file written again since, even with the same content, counts as a change there"
            if older and kept.get("identity", {}).get("data") != now
            else ""
        )
        raise ConfigError(
            f"{where}: {store.describe()} holds checkpoints of a run with other settings or data ({what}{why}); "
            "resuming them would train another run. Run it as it was to resume, delete that folder to start over, or "
            "set checkpoint.dir to a new folder"
        )
    # A finished run's record stays while the run stays the same (finished_run reads it).
    finished = kept.get("finished") if same else None
    logged = kept.get("mlflow") if same else None  # the MLflow run a resumed rerun logs on into
    body = {"fingerprint": fingerprint, "identity": identity, "output_dir": redact(cfg.output_dir)}
    store.write_json(  # all or nothing: a rename on disk, one put on an object store
        RUN_STAMP, {**body, **({"finished": finished} if finished else {}), **({"mlflow": logged} if logged else {})}
    )
    return root


def run_to_resume(root: str, uri: str) -> str | None:
    """The MLflow run a rerun resumes into: the one the stamp recorded (``record_mlflow_run``)
    in the same store, when ``root`` holds checkpoints to resume (a fresh start, or a folder
    reclaimed for other settings, opens a new run)."""
    store = OutputStore(root)
    if not store.exists(RUN_STAMP) or not _holds_checkpoints(store):
        return None
    kept = store.read_json(RUN_STAMP).get("mlflow") or {}
    return kept.get("run_id") if redact(str(kept.get("uri"))) == redact(uri) else None


def record_mlflow_run(root: str, uri: str, run_id: str) -> None:
    """Note in the run's stamp the MLflow run it logs into, for a rerun that resumes it; the
    store's URI without keys (a ``postgresql://user:password@host/db`` store's password), as the
    stamp holds everything: the same store named with other keys is the same store."""
    store = OutputStore(root)
    store.write_json(RUN_STAMP, {**store.read_json(RUN_STAMP), "mlflow": {"uri": redact(uri), "run_id": run_id}})


def record_finished(root: str, result: dict[str, Any]) -> None:
    """Note in the run's stamp that it finished, with what it returned (``finished_run``)."""
    store = OutputStore(root)
    store.write_json(RUN_STAMP, {**store.read_json(RUN_STAMP), "finished": result})


def finished_run(root: str) -> dict[str, Any] | None:
    """What the run claimed in ``root`` returned when it finished (after ``claim_checkpoint_dir``
    kept it: the same settings and data), else None."""
    store = OutputStore(root)
    return store.read_json(RUN_STAMP).get("finished") if store.exists(RUN_STAMP) else None


def _rng_state() -> dict[str, Any]:
    state = {"python": repr(random.getstate()), "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Dropout on a GPU draws from the device's generator, not the CPU one.
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(ast.literal_eval(state["python"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _cpu_encoder(kind: str, path: str | Path, trust_remote_code: bool):
    """A CPU encoder of ``kind`` read from the sentence-transformers folder ``path``."""
    from raytrieve.encoders import load_encoder

    return load_encoder(kind, str(path), device="cpu", trust_remote_code=trust_remote_code)


def full_state_dict(wrapped: torch.nn.Module, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The TrainModule's unsharded state dict (gathered from every rank under FSDP: all ranks call this)."""
    if is_fsdp(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # With full_state_dict the values are plain (gathered) tensors; torch types them as any state.
        return cast(
            "dict[str, torch.Tensor]",
            get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True)),
        )
    return module.state_dict()


def save_encoder(
    encoder, state: dict[str, torch.Tensor], kind: str, model_path: str, target: Path, trust_remote_code: bool = False
) -> None:
    """Save the encoder's weights ``state`` in sentence-transformers format (a CPU copy when sharded)."""
    if any(type(t).__name__ == "DTensor" for t in encoder.parameters()):
        encoder = _cpu_encoder(kind, model_path, trust_remote_code)
        encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")})
    encoder.save(target)


def _is_encoder_key(key: str) -> bool:
    return ".model." in key or key.startswith("encoder.")


def _frozen_prefixes(module) -> tuple[str, ...]:
    """The state-dict prefixes (``losses.0.guide.``) of the losses' submodules that training never
    changes: each has parameters and none requires grad. Their buffers go with them."""
    out: list[str] = []
    for name, sub in module.losses.named_modules(prefix="losses"):
        if any(name.startswith(p) for p in out):
            continue  # inside a frozen module already listed
        params = list(sub.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(f"{name}.")
    return tuple(out)


def _optimizer_state(wrapped, optimizer) -> dict[str, Any]:
    if is_fsdp(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            wrapped, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def _load_weights(wrapped, module, restored, heads: dict[str, torch.Tensor]) -> None:
    state = {f"encoder.{k}": v for k, v in restored.state_dict().items()}
    state.update(heads)
    if is_fsdp(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(wrapped, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    module.load_state_dict(state, strict=False)


def _load_optimizer(wrapped, optimizer, state: dict[str, Any]) -> None:
    if is_fsdp(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # strict=False: parameters that never had a gradient (a pooler that mean pooling skips)
        # have no optimizer state to restore, exactly as in the run that saved it.
        set_optimizer_state_dict(
            wrapped, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False)
        )
        return
    optimizer.load_state_dict(state)


class Checkpointer:
    """One worker's training state, saved and restored: ``module`` (a TrainModule: the encoder
    and one loss per dataset) as ``wrapped`` for DDP/FSDP, its optimizer and schedule.
    ``model_path`` is the model training started from (under FSDP, rank 0 saves through a CPU
    copy of it)."""

    def __init__(
        self,
        wrapped,
        module,
        optimizer,
        schedule,
        kind: str,
        model_path: str,
        rank: int,
        trust_remote_code: bool = False,
    ) -> None:
        self.wrapped, self.module = wrapped, module
        self.optimizer, self.schedule = optimizer, schedule
        self.kind, self.model_path, self.rank = kind, model_path, rank
        # A checkpoint of a remote-code model reloads with the same permission it was trained with.
        self.trust_remote_code = trust_remote_code

    def write(self, directory: Path, step: int) -> None:
        """This rank's part of the checkpoint at ``step`` into ``directory`` (collective under FSDP)."""
        weights = full_state_dict(self.wrapped, self.module)
        optim_state = _optimizer_state(self.wrapped, self.optimizer)
        (directory / _rng_file(self.rank)).write_text(json.dumps(_rng_state()))
        if self.rank == 0:
            save_encoder(
                self.module.encoder, weights, self.kind, self.model_path, directory / MODEL, self.trust_remote_code
            )
            # A loss's own trained parts (SoftmaxLoss' classifier); not its frozen parts (GIST's
            # guide), which the config builds again as they were (a whole model in every
            # checkpoint otherwise).
            frozen = _frozen_prefixes(self.module)
            heads = {
                k: v
                for k, v in weights.items()
                if k.startswith("losses.") and not _is_encoder_key(k) and not k.startswith(frozen)
            }
            torch.save(
                {"optimizer": optim_state, "schedule": self.schedule.state_dict(), "step": step, "loss_heads": heads},
                directory / STATE,
            )

    def read(self, directory: Path) -> int:
        """Restore weights, loss heads, optimizer, schedule and this rank's random state from
        ``directory``; the step it was written at."""
        state = torch.load(directory / STATE, weights_only=True, map_location="cpu")
        restored = _cpu_encoder(self.kind, directory / MODEL, self.trust_remote_code)
        _load_weights(self.wrapped, self.module, restored, state.get("loss_heads", {}))
        _load_optimizer(self.wrapped, self.optimizer, state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        rng = directory / _rng_file(self.rank)
        if rng.exists():
            _set_rng_state(json.loads(rng.read_text()))
        return int(state["step"])

    def save(self, step: int, final: bool = False) -> None:
        """Write the checkpoint at ``step`` and report it to Ray Train (every rank calls this)."""
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            self.write(Path(tmp), step)
            ray.train.report(
                {"step": step, "final": final},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"step-{step:08d}",
            )

    def restore_latest(self) -> int:
        """Restore the newest checkpoint Ray Train registered for this run; its step, or 0 when
        there is none (a fresh start)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0
        with checkpoint.as_directory() as directory:
            return self.read(Path(directory))

    @contextlib.contextmanager
    def saved_model(self, target: str, files: dict[str, str] | None = None) -> Iterator[Path | None]:
        """The trained model, gathered under FSDP (every rank calls this), written by rank 0 to
        ``target`` in sentence-transformers format, replacing what was there: on disk atomically
        (a rename), on an object store file by file behind ``files.INCOMPLETE`` (no rename
        there). ``files``: more files for the folder (name -> text: the model card and the
        config), in place before the folder appears. Yields, on rank 0, a local folder holding
        the model (``target``, or the copy uploaded from, removed after the block); else None."""
        import pyarrow.fs as pafs

        from raytrieve._io import atomic_directory
        from raytrieve.data.files import resolve

        weights = full_state_dict(self.wrapped, self.module)
        if self.rank != 0:
            yield None
            return

        def write(folder: Path) -> None:
            save_encoder(self.module.encoder, weights, self.kind, self.model_path, folder, self.trust_remote_code)
            for name, text in (files or {}).items():
                (folder / name).write_text(text, encoding="utf-8")

        fs, inner = resolve(target)
        if isinstance(fs, pafs.LocalFileSystem):  # a path, or a file:// URI
            with atomic_directory(Path(inner)) as tmp:
                write(tmp)
            yield Path(inner)
            return
        with tempfile.TemporaryDirectory(prefix="raytrieve-model-") as tmp:
            write(Path(tmp))
            OutputStore(target).replace_with(Path(tmp))
            yield Path(tmp)
