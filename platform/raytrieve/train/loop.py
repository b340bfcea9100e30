"""``run_worker``: what every Ray Train worker runs (entered through ``raytrieve.train.entry``).

It loads the encoder, builds one loss per dataset, wraps both for DDP/FSDP, restores the
latest checkpoint if there is one, and streams its rank's planned micro-batches (already
tokenized by the Ray Data stage, re-cut by stream key and padded here) from
``get_dataset_shard``, one dataset per epoch. Rank 0 logs metrics that were averaged over
ranks first. Checkpoints and the final model: ``raytrieve.train.checkpoint``.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch

from raytrieve.encoders import load_encoder
from raytrieve.kinds import model_kind
from raytrieve.model_ref import local_folder
from raytrieve.progress import ClusterCount
from raytrieve.train.config import TrainConfig
from raytrieve.train.entry import FirstEpoch, WorkerSpec, epoch_batches
from raytrieve.train.model_card import CARD_FILE, card_files, summary

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

log = logging.getLogger(__name__)


def build_losses(cfg: TrainConfig, encoder, world_size: int, where: str = "config") -> list[torch.nn.Module]:
    """Each dataset's loss on ``encoder``; errors name the key under ``where`` (the config file)."""
    import inspect

    from raytrieve.losses.registry import build_loss, loss_classes
    from raytrieve.train.config import LossSpec

    losses = []
    for i, d in enumerate(cfg.datasets):
        loss_spec: LossSpec = d.loss
        # Through SpladeLoss, MatryoshkaLoss, ... to the loss that meets the batch (the spec build_loss uses).
        base = loss_spec.base_at(f"{where}.datasets[{i}].loss")
        cls = loss_classes(cfg.model.kind).get(base.name)
        # In-batch negatives from every rank: what makes N workers equal 1 worker on the
        # whole batch. On by default when data-parallel; a config can still say false.
        if world_size > 1 and cls is not None and "gather_across_devices" in inspect.signature(cls.__init__).parameters:
            base.args.setdefault("gather_across_devices", True)
        losses.append(build_loss(loss_spec, encoder, cfg.model.kind, f"{where}.datasets[{i}].loss"))
    return losses


def training_bf16_is_fast(device: torch.device) -> bool:
    """Whether ``training.bf16`` applies on ``device``: a GPU with bf16, or a CPU with AMX/AVX-512 BF16."""
    from raytrieve.encoders.precision import fast_half

    return fast_half(device) == "bfloat16"


def rank_micro_batches(
    spec: WorkerSpec, rank: int, start: int, first: FirstEpoch | None = None
) -> Iterator[tuple[int, Any]]:
    """(micro-batch, its rows as an Arrow table) of this rank from micro-batch ``start`` on, epoch
    by epoch from ``get_dataset_shard("rank{r}_epoch{e}")``; finished epochs are never opened.
    ``first``: an epoch's stream already started (used when the run starts at micro-batch 0)."""
    import numpy as np

    from raytrieve.data.pipeline import micro_batches

    epochs, sizes = np.asarray(spec.micro_batch_epoch), np.asarray(spec.micro_batch_rows)
    for epoch in np.unique(epochs).tolist():
        ms = np.nonzero(epochs == epoch)[0]
        if ms[-1] < start:
            continue  # done before the checkpoint this run resumed from
        if first is not None and first.epoch == epoch and start == 0:
            tables = first.tables()
        else:
            tables = epoch_batches(spec, rank, epoch)
        for m, batch in micro_batches(tables, [(int(m), int(sizes[m])) for m in ms]):
            if m >= start:
                yield m, batch


def run_worker(spec: WorkerSpec, first: FirstEpoch | None = None) -> None:
    """The body of every Ray Train worker (entered through ``raytrieve.train.entry``); ``first``:
    the first epoch's stream, when the entry started it."""
    import ray.train
    import ray.train.torch

    from raytrieve.data.pipeline import decode_features, decode_labels, decode_texts
    from raytrieve.losses.sparse import SpladeLoss, SpladeRegularizerWeightScheduler
    from raytrieve.train.checkpoint import Checkpointer
    from raytrieve.train.cpu_kernels import use_cpu_kernels
    from raytrieve.train.distributed import (
        GradientSync,
        TrainModule,
        is_fsdp,
        mean_across_ranks,
        uses_gradient_cache,
        wrap,
    )
    from raytrieve.train.optim import build_optimizer, build_schedule
    from raytrieve.train.step import Stepper

    cfg = spec.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if spec.threads:
        torch.set_num_threads(spec.threads)  # Ray sets OMP threads from the CPU share; be explicit
    random.seed(cfg.training.seed)
    torch.manual_seed(cfg.training.seed)
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")

    model_folder = local_folder(spec.shipped or spec.model_path)  # this machine's copy
    encoder = load_encoder(
        cfg.model.kind,
        model_folder,
        device=str(device),
        max_seq_length=cfg.model.max_seq_length,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if spec.model_prompts:  # the evaluator and the saved model encode with what the data trained with
        encoder.prompts.update(spec.model_prompts)
    if spec.model_default_prompt is not None:  # a cross-encoder trained with a prompt scores with it
        encoder.default_prompt_name = spec.model_default_prompt
    encoder.train()
    if device.type == "cpu" and cfg.training.cpu_kernels:  # torch's CPU dropout is the slow part
        use_cpu_kernels(encoder)
    losses = build_losses(cfg, encoder, world)
    module = TrainModule(encoder, losses).to(device)
    wrapped = wrap(module, cfg.scaling.strategy, device)
    optimizer = build_optimizer(module.encoder, cfg.optimizer, extra=module.losses)
    schedule = build_schedule(optimizer, cfg.schedule, spec.optimizer_steps)
    cached = any(uses_gradient_cache(loss) for loss in losses)
    stepper = Stepper(
        module,
        optimizer,
        schedule,
        cfg.training.gradient_accumulation_steps,
        cfg.optimizer.max_grad_norm,
        sync=GradientSync(wrapped, manual=cached),
    )
    splade = {
        i: SpladeRegularizerWeightScheduler(loss, spec.optimizer_steps)
        for i, loss in enumerate(losses)
        if isinstance(loss, SpladeLoss)
    }

    checkpoints = Checkpointer(
        wrapped, module, optimizer, schedule, cfg.model.kind, model_folder, rank, cfg.model.trust_remote_code
    )
    step = checkpoints.restore_latest()
    first_step = step  # where this run began: the driver's rate and ETA count from here
    posted = ClusterCount(spec.progress_key) if rank == 0 and spec.progress_key else None
    started = time.monotonic()  # the posted rate counts from here, on this worker's clock
    if posted is not None:
        posted.post(step, start=first_step)

    logger = None
    if rank == 0 and spec.run_id:
        from raytrieve.tracking.mlflow_run import MetricLogger

        assert spec.tracking_uri is not None, "run_training sets tracking_uri with run_id"
        logger = MetricLogger(spec.tracking_uri, spec.run_id)
        if step:
            logger.log({"resumed_from_step": step}, step)
    evaluator = None
    if spec.eval_columns is not None and cfg.eval.evaluator:
        from raytrieve.train.evaluate import build_evaluator

        evaluator = build_evaluator(spec.eval_columns, cfg.eval.evaluator, cfg.model.kind)

    last_eval: dict[str, Any] = {}  # the latest evaluation, for the model card

    def evaluate(at: int) -> None:
        if evaluator is None:
            return
        was_training = encoder.training
        encoder.eval()
        if is_fsdp(wrapped):
            cast("FSDPModule", wrapped).unshard()
        with torch.no_grad():
            metrics = evaluator(encoder)  # every rank runs it: FSDP layers gather collectively
        if is_fsdp(wrapped):
            cast("FSDPModule", wrapped).reshard()
        encoder.train(was_training)
        last_eval.update(step=at, metrics=metrics, primary_metric=getattr(evaluator, "primary_metric", None))
        if logger is not None:
            numbers = {str(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            logger.log(numbers, at)
            # Also under the evaluator's own key names (mlflow_run.EVALUATION_ARTIFACT), at every
            # evaluation: a run restored from its final checkpoint does not evaluate again.
            logger.log_evaluation(numbers)

    evaluate_every = cfg.eval.every_n_steps
    checkpoint_every = cfg.checkpoint.every_n_steps
    accumulation = cfg.training.gradient_accumulation_steps
    start_micro = step * accumulation
    streams = spec.stream.datasets
    tokenized = model_kind(cfg.model.kind).tokenized_rows
    # Each column's input module pads its ids (collate) exactly as the encoder would.
    modules = (
        [[encoder.input_module(d.routes[c] if d.routes else None) for c in range(len(d.columns))] for d in streams]
        if tokenized
        else None
    )
    bf16 = cfg.training.bf16 and training_bf16_is_fast(device)
    if cfg.training.bf16 and not bf16 and rank == 0:
        log.warning("training.bf16: %s has no fast bfloat16; training in float32", device)
    if logger is not None and cfg.training.bf16:  # what training.bf16 did on this hardware
        logger.log({"bf16_autocast": float(bf16)}, step)
    tick = time.perf_counter()
    waited = 0.0  # seconds this step spent waiting for data (the pipeline not keeping up)
    batches = rank_micro_batches(spec, rank, start_micro, first) if step < spec.optimizer_steps else iter(())
    while True:
        asked = time.perf_counter()
        item = next(batches, None)
        waited += time.perf_counter() - asked
        if item is None:
            break
        _, batch = item
        dataset = int(batch.column("dataset")[0].as_py())
        labels = decode_labels(batch, streams[dataset].label_kind)
        if labels is not None and not isinstance(labels, list):
            labels = labels.to(device)
        if not tokenized:
            features = decode_texts(batch, streams[dataset])
        else:
            assert modules is not None  # built whenever rows are tokenized
            features = decode_features(batch, streams[dataset], modules[dataset])
            features = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in f.items()} for f in features]
        weights = splade[dataset].step(step) if dataset in splade else {}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            result = stepper.micro_batch(lambda f, y, d=dataset: wrapped(d, f, y), features, labels)
        if result is None:
            continue
        step += 1
        elapsed = time.perf_counter() - tick
        tick = time.perf_counter()
        metrics = {"loss": result.loss, **{f"loss_{k}": v for k, v in result.components.items()}}
        if len(cfg.datasets) > 1:  # which dataset (and so which loss) this step trained on
            metrics[f"{cfg.datasets[dataset].name}_loss"] = result.loss
        metrics = mean_across_ranks(metrics, device)
        metrics.update(
            learning_rate=result.learning_rate,
            samples_per_s=spec.samples_per_step / max(elapsed, 1e-9),
            data_wait_s=waited,
        )
        waited = 0.0
        if result.grad_norm is not None:
            metrics["grad_norm"] = result.grad_norm
        if dataset in splade:
            metrics.update({f"splade_{k}": v for k, v in weights.items() if v is not None})
        if logger is not None:
            logger.log(metrics, step)
        if posted is not None:
            seconds = round(time.monotonic() - started, 3)
            posted.post(step, start=first_step, seconds=seconds, loss=round(float(metrics["loss"]), 4))
        if evaluate_every and step % evaluate_every == 0:
            evaluate(step)
        if checkpoint_every and step % checkpoint_every == 0 and step < spec.optimizer_steps:
            checkpoints.save(step)
        if step >= spec.optimizer_steps:
            break
    if not (evaluate_every and step % evaluate_every == 0):  # not already evaluated at this step
        evaluate(step)
    if step > first_step or first_step == 0:
        checkpoints.save(step, final=True)
    # else: restored from the final checkpoint itself (the worker group restarted after it, while
    # saving the model): reporting it again under its own name would make Ray Train's manager
    # replace, and with checkpoint.keep 1 delete, the folder the run restores from.
    card = None
    if rank == 0 and spec.card is not None:
        from raytrieve.train import card_facts

        card = card_facts.finish(
            spec.card,
            hardware=card_facts.hardware_facts(device, world, spec.threads, cfg.scaling.strategy, bf16),
            model=card_facts.model_facts(encoder),
            steps=step,
            evaluation=last_eval or None,
            run_id=spec.run_id,
        )
    files = card_files(card) if card is not None else None
    with checkpoints.saved_model(cfg.output_dir, files=files) as folder:
        if logger is not None and folder is not None:
            logger.log_model_dir(folder)  # the card and config inside the model artifact
            if card is not None and files is not None:
                logger.log_model_card(files[CARD_FILE], summary(card))
