"""The encoding job on two real Ray nodes on this host: encode actors on both write shards
straight to the output, and losing the second node mid-job (its raylet, object store and
workers SIGKILLed) followed by a rerun gives every id exactly once with the right vectors.
The model is a registered MLflow version, downloaded into the driver's cache: the second
node, with a cache of its own, gets it through Ray's object store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from raytrieve.inference.shards import read_vectors
from tests.conftest import SENTENCES, SecondNode, state_address
from tests.train_helpers import ROOT


def _sidecars(out: Path) -> list[dict]:
    found = []
    for p in out.glob("part-*.json"):
        try:
            found.append(json.loads(p.read_text()))
        except json.JSONDecodeError:  # being renamed into place right now
            pass
    return found


@pytest.fixture
def big_second_node(ray_cluster, tmp_path_factory):
    """A second node of 2 CPUs: with encode actors of 1.5 CPUs, each node holds exactly one. Its
    RAYTRIEVE_CACHE is its own, as another machine's would be."""
    cache = tmp_path_factory.mktemp("node2-cache")
    node = SecondNode(ray_cluster, tmp_path_factory.mktemp("node2"), cpus=2, env={"RAYTRIEVE_CACHE": str(cache)})
    node.cache = cache
    yield node
    node.kill()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _live_encode_actors() -> list:
    """Ray's state of every live encode actor (Ray Data names its workers after their stage)."""
    from ray.util.state import list_actors

    alive = list_actors(state_address(), filters=[("state", "=", "ALIVE")], detail=True, limit=10_000,
                        raise_on_missing_output=False)
    return [a for a in alive if "EncodeAndWrite" in (a.repr_name or "")]


def _one_per_node(expect: int, exclude: frozenset[str]) -> dict[str, int]:
    """Node id -> pid of the live encode actors not in ``exclude`` (an earlier job's), once there
    are ``expect`` of them on as many nodes, else {}."""
    found = [a for a in _live_encode_actors() if a.actor_id not in exclude]
    by_node = {a.node_id: a.pid for a in found}
    return by_node if len(found) == len(by_node) == expect else {}


def _until(what: str, driver: subprocess.Popen, condition, every: float = 0.05, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := condition():
            return value
        assert driver.poll() is None, f"the job ended before {what}"
        time.sleep(every)
    raise AssertionError(f"timed out waiting until {what}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_write_shards_and_a_lost_node_reruns_exactly_once(ray_cluster, big_second_node, tiny_models,
                                                                       registry, tmp_path):
    from raytrieve.encoders import DenseEncoder

    second_node = big_second_node
    n = 300
    texts = [f"{SENTENCES[i % len(SENTENCES)]} (item {i})" for i in range(n)]
    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(n)], "text": texts}), tmp_path / "corpus.parquet")
    out = tmp_path / "vectors"
    # Two encode actors of 1.5 CPUs on two nodes of 2 CPUs: one runs on each node, wherever
    # the half-CPU reader lands.
    config = {"corpus": {"path": str(tmp_path / "corpus.parquet")}, "output_dir": str(out), "rows_per_shard": 10,
              "dense": {"model": "models:/tiny-dense/1", "dtype": "float32"},
              "compute": {"encode_actors": 2, "cpus_per_encode_actor": 1.5, "torch_threads": 1, "token_budget": 256}}
    config_path = tmp_path / "encode.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "PYTHONPATH": str(ROOT / "platform"), "MLFLOW_TRACKING_URI": registry["uri"],
           "RAYTRIEVE_CACHE": str(registry["cache"]), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    command = [sys.executable, str(ROOT / "jobs" / "encode.py"), "--config", str(config_path)]
    head, other = ray_cluster.get_runtime_context().get_node_id(), second_node.node_id

    def written(node: str) -> int:
        return [s["node"] for s in _sidecars(out)].count(node)

    # Who encodes what is steered with SIGSTOP/SIGCONT on the two encode actors, not left to timing:
    # Ray Data sends a block to the actor on the node that holds it while that actor has room, and
    # the new node's first shard could take longer than the head's whole job (CI of stop 36: all
    # 30 shards written before the kill). Work starts only once both actors are up
    # (RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S), and both are paused as soon as they are seen.
    earlier = frozenset(a.actor_id for a in _live_encode_actors())
    driver = subprocess.Popen(command, env={**env, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "180"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    actors: dict[str, int] = {}
    try:
        actors = _until("both encode actors are up", driver, lambda: _one_per_node(2, earlier), every=0.5)
        assert set(actors) == {head, other}, "one encode actor on each node"
        for pid in actors.values():
            os.kill(pid, signal.SIGSTOP)
        # The paused head keeps what was dispatched to it, so the second node gets the next shards.
        os.kill(actors[other], signal.SIGCONT)
        _until("the second node writes a shard", driver, lambda: written(other) >= 1)
        os.kill(actors[other], signal.SIGSTOP)
        # The second node encoded with its own copy of the driver's download, unpacked in its cache.
        downloaded = next((registry["cache"] / "mlflow").rglob("modules.json")).parent
        copies = list((second_node.cache / "shipped").iterdir())
        assert len(copies) == 1 and _files(copies[0]) == _files(downloaded)
        if not written(head):
            os.kill(actors[head], signal.SIGCONT)
            _until("the head writes a shard", driver, lambda: written(head) >= 1)
            os.kill(actors[head], signal.SIGSTOP)
        # Both paused with shards left, so the node is lost mid-job.
        assert len(_sidecars(out)) < n // 10, "the node is lost mid-job"
        second_node.kill()
    finally:
        for pid in actors.values():  # never leave a paused worker in the session's cluster
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        try:  # the job may finish on the head alone, or wait for a node that never returns
            driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["shards_written"] + summary["shards_reused"] == n // 10
    v = read_vectors(out)
    assert v.ids == [f"doc-{i}" for i in range(n)]
    np.testing.assert_allclose(v.dense, DenseEncoder(tiny_models["dense"]).encode_document(
        texts, normalize_embeddings=True), atol=1e-5)
    assert not list(out.glob(".*.tmp-*"))
