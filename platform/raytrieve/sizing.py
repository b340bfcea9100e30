"""Defaults sized from the cluster a job runs on: torch threads for training workers, the
encoding job's actor pool, and the CPUs of Serve's model replicas.

A setting the config gives always wins; these only fill what it leaves unset. The rules are
plain arithmetic over ``ClusterShape`` (tests call them without Ray); ``cluster_shape()`` reads
the shape from the Ray this process is connected to.

Why these rules, measured on a 2-core machine (BENCHMARKS.md): a training worker that holds one
CPU of Ray's accounting but runs one torch thread leaves half the machine idle (fine-tuning
MiniLM ran at 0.68x sentence-transformers with the old default, 1.8x with two threads in bf16);
an encoding job with one single-threaded actor uses one core of sixteen; and three Serve
replicas of one CPU each never start on two CPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raytrieve.inference.config import EncodeComputeConfig

# What Serve's small actors ask for (ingress, a retriever when one runs): they mostly wait on the model replicas.
LIGHT_ACTOR_CPUS = 0.1
# Ray Data's read-and-tokenize tasks of an encoding job (a tokenizer actor's share).
TOKENIZER_CPUS = 0.5


@dataclass(frozen=True)
class ClusterShape:
    cpus: float  # all alive nodes together
    largest_node_cpus: float  # one worker or replica never spans nodes
    gpus: float = 0.0
    largest_node_gpus: float = 0.0
    nodes: int = 1  # alive, with the CPU for a light actor


def cluster_shape() -> ClusterShape:
    """The shape of the cluster this process's Ray is connected to (alive nodes only)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus = [float(r.get("CPU", 0.0)) for r in nodes] or [0.0]
    gpus = [float(r.get("GPU", 0.0)) for r in nodes] or [0.0]
    # Nodes that can hold a light actor (an ingress replica): a head started with 0 CPUs cannot.
    usable = sum(1 for c in cpus if c >= LIGHT_ACTOR_CPUS)
    return ClusterShape(sum(cpus), max(cpus), sum(gpus), max(gpus), max(1, usable))


def bundles_that_fit(nodes: list[dict[str, float]], bundle: dict[str, float], strategy: str = "PACK") -> int:
    """How many of ``bundle`` (one training worker's resources) the nodes' totals place at once:
    a bundle never spans nodes; STRICT_PACK puts them all on one node, STRICT_SPREAD one per node."""
    per_node = [
        min((math.floor(node.get(r, 0.0) / need + 1e-9) for r, need in bundle.items() if need > 0), default=0)
        for node in nodes
    ]
    if strategy == "STRICT_PACK":
        return max(per_node, default=0)
    if strategy == "STRICT_SPREAD":
        return sum(1 for n in per_node if n >= 1)
    return sum(per_node)


def train_threads(shape: ClusterShape, num_workers: int) -> int:
    """Torch threads per training worker: the cluster's CPUs shared evenly among the workers,
    at most one node's. One worker on an embedded Ray gets the whole machine; its Ray Data read
    tasks (reading and tokenizing) are light beside the model's forward and backward passes."""
    share = math.floor(shape.cpus / max(1, num_workers))
    return max(1, min(share, int(shape.largest_node_cpus)))


def default_encode_actors(shape: ClusterShape, compute: EncodeComputeConfig, use_gpu: bool, shards: int) -> int:
    """``compute.encode_actors`` when the config leaves it unset: one actor per GPU on GPUs; on
    CPUs as many as the cluster's CPUs hold beside the tokenizer actors, at least one (raise
    ``compute.cpus_per_encode_actor`` to trade actors for threads, e.g. for a large model's
    memory). Never more than the shards to encode (each actor loads the model)."""
    if use_gpu:
        actors = int(shape.gpus)
    else:
        free = shape.cpus - TOKENIZER_CPUS * compute.tokenize_actors
        actors = math.floor(free / compute.cpus_per_encode_actor + 1e-9)
    return max(1, min(actors, shards))


def serve_replica_cpus(shape: ClusterShape, models: int, light_actors: int) -> float:
    """CPUs of each model replica when the config sets none: the cluster's CPUs beside the light
    actors (ingress, a retriever when one runs), split evenly among the model deployments, in
    steps of 0.05 so that the sum fits; at most one node's, and never more than 4 (a batch-1 query gains little
    from more threads; more replicas serve more requests)."""
    free = shape.cpus - LIGHT_ACTOR_CPUS * light_actors
    share = math.floor(free / max(1, models) * 20) / 20
    return max(0.05, min(share, shape.largest_node_cpus, 4.0))


def replica_threads(num_cpus: float) -> int:
    """Torch threads for a replica of ``num_cpus``: its share rounded, at least one (replicas on
    the same cores must not oversubscribe them: 2 threads each for two replicas on 2 cores took
    a query from 14.5 ms to 175 ms)."""
    return max(1, round(num_cpus))
