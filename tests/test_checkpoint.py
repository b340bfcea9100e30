"""raytrieve.train.checkpoint without Ray: a checkpoint of a tiny model with a loss head, its
optimizer and schedule reads back into fresh ones with equal weights, optimizer state,
schedule, step and random state; a run's checkpoint folder refuses another run's config.
(Reporting to Ray Train, FSDP and resuming a killed run: tests/test_train_e2e.py -k resume.)"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from raytrieve import DenseEncoder
from raytrieve.config import from_dict
from raytrieve.errors import ConfigError
from raytrieve.losses.pairwise import SoftmaxLoss
from raytrieve.losses.ranking import GISTEmbedLoss
from raytrieve.train.checkpoint import MODEL, RUN_STAMP, STATE, Checkpointer, checkpoint_dir, claim_checkpoint_dir
from raytrieve.train.config import OptimizerConfig, ScheduleConfig, TrainConfig, TrainingConfig
from raytrieve.train.distributed import TrainModule
from raytrieve.train.optim import build_optimizer, build_schedule
from raytrieve.train.plan import DatasetKeys, plan_training
from tests.conftest import SENTENCES


def _worker(model_path, seed: int, guided: bool = False) -> Checkpointer:
    """What run_worker builds on one rank without DDP: the module is its own wrapper. ``guided``:
    a second dataset's loss is GIST with a frozen guide model, as the loss registry builds it."""
    torch.manual_seed(seed)  # the loss head starts from different weights per seed
    encoder = DenseEncoder(model_path, device="cpu").train()
    losses: list[torch.nn.Module] = [SoftmaxLoss(encoder, embedding_dimension=32, num_labels=3)]
    if guided:
        losses.append(GISTEmbedLoss(encoder, guide=DenseEncoder(model_path, device="cpu").requires_grad_(False)))
    module = TrainModule(encoder, losses)
    optimizer = build_optimizer(module.encoder, OptimizerConfig(learning_rate=1e-3), extra=module.losses)
    schedule = build_schedule(optimizer, ScheduleConfig(), total_steps=10)
    return Checkpointer(module, module, optimizer, schedule, "dense", str(model_path), rank=0)


def _train(worker: Checkpointer, steps: int) -> None:
    encoder = worker.module.encoder
    features = [encoder.tokenize(SENTENCES[:4]), encoder.tokenize(SENTENCES[4:8])]
    for _ in range(steps):
        worker.module(0, features, torch.tensor([0, 1, 2, 1])).backward()
        worker.optimizer.step()
        worker.schedule.step()
        worker.optimizer.zero_grad()


def _assert_equal_state(got, want, where: str) -> None:
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            _assert_equal_state(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_equal_state(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


def test_a_checkpoint_reads_back_into_fresh_training_state(tiny_models, tmp_path):
    saved = _worker(tiny_models["dense"], seed=0)
    _train(saved, steps=2)
    random.seed(11)
    torch.manual_seed(12)
    saved.write(tmp_path, step=2)
    next_python, next_torch = random.random(), torch.rand(4)  # what the run would draw next

    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL, "rng-0.json", STATE]
    assert (tmp_path / MODEL / "modules.json").exists()  # a sentence-transformers folder, loadable as is
    assert json.loads((tmp_path / "rng-0.json").read_text()).keys() == {"python", "torch"}

    restored = _worker(tiny_models["dense"], seed=1)
    assert not torch.equal(
        restored.module.losses[0].classifier.weight, saved.module.losses[0].classifier.weight
    ), "the fresh state must differ for the comparison to mean anything"
    random.seed(0)
    torch.manual_seed(0)
    assert restored.read(tmp_path) == 2

    _assert_equal_state(restored.module.state_dict(), saved.module.state_dict(), "weights")
    _assert_equal_state(restored.optimizer.state_dict(), saved.optimizer.state_dict(), "optimizer")
    assert saved.optimizer.state_dict()["state"], "two steps of AdamW leave moments to restore"
    _assert_equal_state(restored.schedule.state_dict(), saved.schedule.state_dict(), "schedule")
    assert random.random() == next_python
    assert torch.equal(torch.rand(4), next_torch)

    # Training on from the restored state goes where the saved one goes.
    for worker in (saved, restored):
        torch.manual_seed(3)
        _train(worker, steps=1)
    _assert_equal_state(restored.module.state_dict(), saved.module.state_dict(), "weights after a step")


def test_a_losss_frozen_parts_stay_out_of_the_checkpoint_and_its_trained_parts_go_in(tiny_models, tmp_path):
    """GIST's guide is a whole frozen model that the config builds again: it stays out of every
    checkpoint's loss heads, which keep what training changes (SoftmaxLoss' classifier)."""
    saved = _worker(tiny_models["dense"], seed=0, guided=True)
    _train(saved, steps=1)
    saved.write(tmp_path, step=1)
    heads = torch.load(tmp_path / STATE, weights_only=True)["loss_heads"]
    assert sorted(heads) == ["losses.0.classifier.bias", "losses.0.classifier.weight"]

    restored = _worker(tiny_models["dense"], seed=1, guided=True)
    assert restored.read(tmp_path) == 1
    _assert_equal_state(restored.module.state_dict(), saved.module.state_dict(), "weights")
    assert not any(p.requires_grad for p in restored.module.losses[1].guide.parameters())


def test_a_rank_without_its_random_state_keeps_its_own(tiny_models, tmp_path):
    """Only rank 0 writes model/ and state.pt; a rank whose rng file is absent restores the rest."""
    saved = _worker(tiny_models["dense"], seed=0)
    saved.write(tmp_path, step=0)
    (tmp_path / "rng-0.json").unlink()
    restored = _worker(tiny_models["dense"], seed=1)
    random.seed(5)
    want = random.random()
    random.seed(5)
    assert restored.read(tmp_path) == 0
    assert random.random() == want
    _assert_equal_state(restored.module.state_dict(), saved.module.state_dict(), "weights")


def _config(tmp_path, **optimizer) -> TrainConfig:
    return from_dict(
        TrainConfig,
        {
            "model": {"name_or_path": "all-minilm-l6-v2", "kind": "dense"},
            "datasets": [{"name": "pairs", "path": "pairs.parquet", "loss": {"name": "MultipleNegativesRankingLoss"}}],
            "output_dir": str(tmp_path / "out" / "model"),
            "optimizer": optimizer,
        },
    )


def test_the_checkpoint_folder_belongs_to_one_run(tmp_path):
    plan = plan_training([DatasetKeys("pairs", 16)], TrainingConfig(batch_size=4, batch_sampler="default", seed=3), 1)
    cfg = _config(tmp_path)
    data = {"pairs": {"rows": 16, "sha256": "aa"}}
    root = claim_checkpoint_dir(cfg, plan, "job.yaml", data)
    assert str(root) == checkpoint_dir(cfg) == str((tmp_path / "out" / "model.checkpoints").resolve())
    root = Path(root)
    assert [p.name for p in root.iterdir()] == [RUN_STAMP]  # written through a temporary, none left
    assert claim_checkpoint_dir(cfg, plan, "job.yaml", data) == str(root)  # the same run resumes
    # Stopped before its first checkpoint (a bad MLflow URI, too few CPUs): nothing to resume, so
    # the fixed config starts there; it was refused, and the advised fix with it.
    assert claim_checkpoint_dir(_config(tmp_path, learning_rate=1e-3), plan, "job.yaml", data) == str(root)
    (root / "run" / "step-00000004").mkdir(parents=True)  # a checkpoint Ray Train registered
    refusals = {
        "optimizer.learning_rate: 0.001 -> 2e-05": (_config(tmp_path), data),
        "data.pairs.sha256: 'aa' -> 'bb'": (_config(tmp_path, learning_rate=1e-3), {"pairs": {"rows": 16, "sha256": "bb"}}),
    }
    for differs, (other, files) in refusals.items():
        with pytest.raises(ConfigError) as refused:
            claim_checkpoint_dir(other, plan, "job.yaml", files)
        assert f"job.yaml: {root} holds checkpoints of a run with other settings or data ({differs})" in str(
            refused.value), str(refused.value)
    # Where it writes, tracks, checkpoints, evaluates and how many threads: a resume may change them.
    moved = _config(tmp_path, learning_rate=1e-3)
    moved.mlflow.experiment, moved.checkpoint.keep, moved.scaling.torch_threads = "other", 5, 3
    assert claim_checkpoint_dir(moved, plan, "job.yaml", data) == str(root)
    moved.datasets[0].path = "/elsewhere/pairs.parquet"  # the same data (its digest) in another place
    assert claim_checkpoint_dir(moved, plan, "job.yaml", data) == str(root)
    moved.datasets[0].path, moved.datasets[0].format = "/elsewhere/pairs.txt", "jsonl"  # converted, named
    assert claim_checkpoint_dir(moved, plan, "job.yaml", data) == str(root)


def test_a_stamp_that_kept_the_datasets_format_resumes_in_any_format(tmp_path):
    """Stamps of the versions before 2026-12-05's evening kept each dataset's ``format`` (null:
    from the file's name), so the same rows converted to another format, or the format named,
    were refused. They resume now, and a real difference is named without the format."""
    from raytrieve.train.checkpoint import _fingerprint

    plan = plan_training([DatasetKeys("pairs", 16)], TrainingConfig(batch_size=4, batch_sampler="default", seed=3), 1)
    data = {"pairs": {"rows": 16, "sha256": "aa"}}
    root = claim_checkpoint_dir(_config(tmp_path), plan, "job.yaml", data)
    root = Path(root)
    (root / "run" / "step-00000004").mkdir(parents=True)
    now = json.loads((root / RUN_STAMP).read_text())
    assert "format" not in now["identity"]["datasets"][0] and "path" not in now["identity"]["datasets"][0]
    kept = json.loads(json.dumps(now["identity"]))
    kept["datasets"][0]["format"] = None
    (root / RUN_STAMP).write_text(json.dumps({**now, "fingerprint": _fingerprint(kept), "identity": kept}))
    cfg = _config(tmp_path)
    cfg.datasets[0].path, cfg.datasets[0].format = "pairs.jsonl", "jsonl"
    assert claim_checkpoint_dir(cfg, plan, "job.yaml", data) == str(root)
    assert json.loads((root / RUN_STAMP).read_text())["identity"] == now["identity"]  # stamped anew
    (root / RUN_STAMP).write_text(json.dumps({**now, "fingerprint": _fingerprint(kept), "identity": kept}))
    with pytest.raises(ConfigError, match=r"\(optimizer.learning_rate: 2e-05 -> 0.001\); resuming"):
        claim_checkpoint_dir(_config(tmp_path, learning_rate=1e-3), plan, "job.yaml", data)


def test_checkpoints_resume_across_an_upgrade_that_adds_settings_at_their_defaults(tmp_path):
    """Every setting is part of a run's stamp, so a raytrieve that added one (training.cpu_kernels,
    say) refused the checkpoints of every run stamped before it. A setting the stamp lacks that
    holds its default now is no change (a new setting's default trains as runs before it did); set
    to anything else, or any other difference, it is one."""
    from raytrieve.train.checkpoint import _fingerprint

    plan = plan_training([DatasetKeys("pairs", 16)], TrainingConfig(batch_size=4, batch_sampler="default", seed=3), 1)
    data = {"pairs": {"rows": 16, "sha256": "aa"}}
    root = claim_checkpoint_dir(_config(tmp_path), plan, "job.yaml", data)
    root = Path(root)
    (root / "run" / "step-00000004").mkdir(parents=True)
    now = json.loads((root / RUN_STAMP).read_text())

    def stamped_before(*settings: str, extra: dict | None = None) -> None:
        """The stamp as a raytrieve without ``settings`` (``extra``: with a setting since gone) wrote it."""
        identity = json.loads(json.dumps(now["identity"]))
        for name in settings:
            *path, key = name.split(".")
            owner = identity
            for part in path:
                owner = owner[int(part)] if isinstance(owner, list) else owner[part]
            del owner[key]
        identity["training"].update(extra or {})
        earlier = {"fingerprint": _fingerprint(identity), "identity": identity, "output_dir": now["output_dir"],
                   "mlflow": {"uri": "file:///x", "run_id": "r1"}}
        (root / RUN_STAMP).write_text(json.dumps(earlier))

    # Defaults of each kind: a flag, a number, null, an empty mapping, a whole section.
    stamped_before("training.cpu_kernels", "optimizer.max_grad_norm", "model.max_seq_length",
                   "datasets.0.router_mapping", "datasets.0.loss.args", "optimizer")
    assert claim_checkpoint_dir(_config(tmp_path), plan, "job.yaml", data) == str(root)
    assert json.loads((root / RUN_STAMP).read_text()) == {**now, "mlflow": {"uri": "file:///x", "run_id": "r1"}}
    refusals = {  # what the refusal names: the one real difference, not the settings added at defaults
        "optimizer.max_grad_norm: None -> 0.5": (("training.cpu_kernels", "optimizer.max_grad_norm"), {},
                                                  {"max_grad_norm": 0.5}),
        "optimizer.learning_rate: 2e-05 -> 0.001)": (("training.cpu_kernels",), {}, {"learning_rate": 1e-3}),
        "training.old_setting: 1 -> None)": (("training.cpu_kernels",), {"old_setting": 1}, {}),
        # A new section judged whole: one of its settings set otherwise is a change.
        "optimizer.weight_decay: None -> 0.5)": (("optimizer",), {}, {"weight_decay": 0.5}),
    }
    for differs, (missing, extra, optimizer) in refusals.items():
        stamped_before(*missing, extra=extra)
        with pytest.raises(ConfigError) as refused:
            claim_checkpoint_dir(_config(tmp_path, **optimizer), plan, "job.yaml", data)
        assert f"({differs}" in str(refused.value) and "cpu_kernels" not in str(refused.value), str(refused.value)


def test_a_setting_a_stamp_lacks_is_held_against_its_own_default():
    """The rule on its own: an optional section added since is at its default only while it is
    null (not when set to a section of defaults), a new section's leaves against the section's
    default, a null or empty-mapping default counts, and a null the stamp held is no new setting."""
    from pydantic import BaseModel

    from raytrieve.config import added_settings_at_default, differing_settings

    class Sub(BaseModel):
        a: int = 1
        b: dict = {}

    class Cfg(BaseModel):
        x: int = 0
        opt: Sub | None = None
        sub: Sub = Sub()
        n: int | None = None

    def forgiven(kept: dict, cfg: Cfg) -> tuple[set, set]:
        now = json.loads(json.dumps(cfg.model_dump(mode="json")))
        return added_settings_at_default(kept, now, cfg), differing_settings(kept, now)

    assert forgiven({"x": 0}, Cfg()) == ({"opt", "sub.a", "sub.b", "n"},) * 2
    assert forgiven({"x": 0}, Cfg(opt=Sub(), sub=Sub(a=2), n=3)) == ({"sub.b"}, {"opt.a", "opt.b", "sub.a", "sub.b", "n"})
    assert forgiven({"x": 0, "sub": {"a": 1}, "n": None, "opt": None}, Cfg(opt=Sub())) == (
        {"sub.b"}, {"sub.b", "opt", "opt.a", "opt.b"})

    # The whole config kept beside an identity (an encoding job's job.json) decides a setting it
    # holds: no change at the value it held, default or not; a change at any other, of any shape
    # (a mapping's keys, a section it held as null) where no leaf of it matches a leaf of now.
    from raytrieve.config import differences

    def against(held: dict, cfg: Cfg) -> set:
        now = json.loads(json.dumps(cfg.model_dump(mode="json")))
        return added_settings_at_default({"x": 0}, now, cfg, held)

    assert against({"n": 3, "sub": {"a": 2, "b": {}}}, Cfg(sub=Sub(a=2), n=3)) == {"opt", "sub.a", "sub.b", "n"}
    assert against({"n": None, "sub": {"a": 1, "b": {"k": "v"}}, "opt": None}, Cfg(opt=Sub())) == {"n"}
    assert against({"sub": None}, Cfg()) == {"opt", "n"}
    now = json.loads(json.dumps(Cfg(n=3).model_dump(mode="json")))
    assert differences({"x": 0}, now, held={"n": 4}) == "n: 4 -> 3; opt: None -> None; sub.a: None -> 1; sub.b: None -> {}"
