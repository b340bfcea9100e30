"""In-batch negatives across data-parallel ranks: 2 gloo processes, each with half the batch,
encoder and loss wrapped in DDP the way the train loop does it (raytrieve.train.distributed)
and gather_across_devices=True, give the loss and the gradients of 1 process on the whole
batch, for every loss the trainer gathers by default (MNRL, its symmetric form, GISTEmbed and
their GradCache forms). GradCache under DDP all-reduces gradients once per step, not once per
mini-batch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tests.conftest import free_port
from tests.test_losses_dense import ANCHORS, NEGATIVES, POSITIVES, _build

import raytrieve.losses as L
from raytrieve import DenseEncoder

COLUMNS = [ANCHORS, POSITIVES, NEGATIVES]


def _loss(name: str, model, guide_path: str):
    if name in ("mnrl", "fsdp"):
        return L.MultipleNegativesRankingLoss(model, gather_across_devices=True)
    if name == "mnrl_sym":
        directions = ("query_to_doc", "doc_to_query")
        return L.MultipleNegativesRankingLoss(model, gather_across_devices=True, directions=directions)
    if name == "mnsrl":
        return L.MultipleNegativesSymmetricRankingLoss(model, gather_across_devices=True)
    if name == "cached_mnsrl":
        return L.CachedMultipleNegativesSymmetricRankingLoss(model, mini_batch_size=2, gather_across_devices=True)
    if name in ("gist", "cached_gist"):
        guide = DenseEncoder(guide_path, device="cpu")
        # A margin so the guide masks some in-batch candidates (false negatives). Temperature 0.05
        # (scale 20, as MNRL's) rather than the default 0.01: a scale of 100 magnifies float32
        # summation-order noise between the gathered and the single-process matmuls to ~5e-5.
        kw = {"margin": 0.05, "temperature": 0.05, "gather_across_devices": True}
        if name == "gist":
            return L.GISTEmbedLoss(model, guide, **kw)
        return L.CachedGISTEmbedLoss(model, guide, mini_batch_size=2, **kw)
    return L.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2, gather_across_devices=True)


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


CASES = [
    ("mnrl", 2),
    ("mnrl", 3),
    ("mnrl_sym", 3),
    ("cached", 3),
    ("mnsrl", 3),
    ("cached_mnsrl", 3),
    ("gist", 2),
    ("gist", 3),
    ("cached_gist", 3),
]


def _worker(rank: int, world: int, port: int, path: str, guide_path: str, out: str) -> None:
    from raytrieve.train.distributed import GradientSync, TrainModule, uses_gradient_cache, wrap

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for name, cols in CASES:
        model = DenseEncoder(path, device="cpu").train()
        loss_fn = _loss(name, model, guide_path)
        ddp = wrap(TrainModule(model, [loss_fn]), "ddp", torch.device("cpu"))
        calls = []

        def counting_allreduce(state, bucket, calls=calls):
            calls.append(1)
            tensor = bucket.buffer() / world
            return dist.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, counting_allreduce)
        half = len(ANCHORS) // world
        features = [model.tokenize(c[rank * half : (rank + 1) * half]) for c in COLUMNS[:cols]]
        sync = GradientSync(ddp, manual=uses_gradient_cache(loss_fn))
        with sync.context(last_micro_batch=True):
            loss = ddp(0, features, None)
            loss.backward()
        sync.finish()  # the cached loss's one all-reduce per step
        value = loss.detach().clone()
        dist.all_reduce(value)
        results[f"{name}-{cols}"] = {
            "loss": value / world,
            "grads": _grads(model),
            "reducer_calls": torch.tensor(len(calls)),
        }
    # FSDP: each transformer block and the root sharded over the 2 ranks; the gathered full
    # gradients equal the single process's too.
    model = DenseEncoder(path, device="cpu").train()
    loss_fn = _loss("mnrl", model, guide_path)
    fsdp = wrap(TrainModule(model, [loss_fn]), "fsdp", torch.device("cpu"))
    features = [model.tokenize(c[rank * half : (rank + 1) * half]) for c in COLUMNS[:3]]
    loss = fsdp(0, features, None)
    loss.backward()
    grads = [p.grad.full_tensor() if p.grad is not None else torch.zeros(p.shape) for p in model.parameters()]
    value = loss.detach().clone()
    dist.all_reduce(value)
    results["fsdp-3"] = {"loss": value / world, "grads": grads}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    path = _build(tmp_path, "m", seed=0, dense=True)
    guide_path = _build(tmp_path, "guide", seed=7)
    out = str(tmp_path / "ranks.pt")
    # One spawn for every case: starting a process costs more than the cases themselves.
    mp.spawn(_worker, args=(2, free_port(), str(path), str(guide_path), out), nprocs=2, join=True)
    ranks = torch.load(out, weights_only=True)
    for name, cols in [*CASES, ("fsdp", 3)]:
        single = DenseEncoder(path, device="cpu").train()
        # Outside torch.distributed the gather is the identity: this is the plain loss on the whole batch.
        value = _loss(name, single, str(guide_path))([single.tokenize(c) for c in COLUMNS[:cols]], None)
        value.backward()
        got = ranks[f"{name}-{cols}"]
        torch.testing.assert_close(got["loss"], value.detach(), atol=1e-5, rtol=1e-4, msg=name)
        for a, b in zip(got["grads"], _grads(single)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    # DDP's reducer all-reduced the plain losses' gradients; the cached loss (3 columns x 2
    # mini-batches per rank) ran under no_sync, and its gradients came from the one
    # all-reduce of GradientSync.finish, not from one per mini-batch.
    assert int(ranks["mnrl-3"]["reducer_calls"]) >= 1
    assert int(ranks["cached-3"]["reducer_calls"]) == 0
    assert int(ranks["cached_gist-3"]["reducer_calls"]) == 0
