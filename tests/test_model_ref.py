"""One resolver for every model reference (raytrieve.model_ref.resolve_model): the encoder
constructors take an MLflow URI as load_encoder does, against a real MLflow registry (sqlite in
tmp), and a bad reference fails the same way wherever it is given, naming it and what is
accepted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import SENTENCES

from raytrieve import CrossEncoder, DenseEncoder, SparseEncoder
from raytrieve.encoders import load_encoder
from raytrieve.errors import ModelLoadError
from raytrieve.model_ref import resolve_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def registry(tiny_models, tmp_path_factory):
    """tiny-dense version 1 (the tiny dense model) and version 2 (its weights shifted), each
    registered as training does it: the folder is a run's ``model`` artifact, then a version."""
    from raytrieve.tracking import mlflow_run

    root = tmp_path_factory.mktemp("model_ref")
    shifted = DenseEncoder(tiny_models["dense"], device="cpu")
    with torch.no_grad():
        for p in shifted.parameters():
            p.add_(0.01)
    shifted.save(root / "shifted")
    uri = f"sqlite:///{root}/mlflow.db"
    # An explicit artifact location: sqlite's default would write ./mlruns into the checkout.
    mlflow_run.client(uri).create_experiment("model-ref-tests", artifact_location=(root / "artifacts").as_uri())
    runs = []
    for folder in (tiny_models["dense"], root / "shifted"):
        run_id = mlflow_run.start_run(uri, "model-ref-tests", "tiny-dense", {}, {})
        mlflow_run.MetricLogger(uri, run_id).log_model_dir(folder)
        mlflow_run.end_run(uri, run_id, "FINISHED")
        runs.append((run_id, mlflow_run.register_model(uri, run_id, "tiny-dense")))
    assert [v for _, v in runs] == ["1", "2"]
    # A rerun of a run stopped while it registered resumes into the same MLflow run: no new version.
    assert mlflow_run.register_model(uri, runs[0][0], "tiny-dense") == "1"
    assert len(mlflow_run.client(uri).search_model_versions("name = 'tiny-dense'")) == 2
    return {"uri": uri, "root": root, "folders": [tiny_models["dense"], root / "shifted"], "runs": runs}


@pytest.fixture
def store(registry, tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI names the registry (as the README says); downloads go to tmp_path."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return registry


def _dense(model) -> np.ndarray:
    return model.encode(SENTENCES, convert_to_numpy=True)


def test_encoder_constructor_takes_a_registered_model(store, tmp_path):
    folder = DenseEncoder(store["folders"][0], device="cpu")
    registered = DenseEncoder("models:/tiny-dense/1", device="cpu")
    # Loaded from the download in the cache, not from the folder that was logged.
    assert Path(registered.name_or_path).is_relative_to(tmp_path / "cache" / "mlflow")
    np.testing.assert_array_equal(_dense(registered), _dense(folder))
    np.testing.assert_array_equal(_dense(load_encoder("dense", "models:/tiny-dense/1")), _dense(folder))
    # A second load reads the cache: the same folder, nothing downloaded again.
    assert resolve_model("models:/tiny-dense/1") == Path(registered.name_or_path)
    run_id, _ = store["runs"][1]
    np.testing.assert_array_equal(
        _dense(DenseEncoder(f"runs:/{run_id}/model", device="cpu")),
        _dense(DenseEncoder(store["folders"][1], device="cpu")),
    )


def test_a_download_draws_no_bar_where_stderr_is_no_terminal(store, monkeypatch, capfd):
    """MLflow's per-file download bars are drawn on a terminal only, as raytrieve's own: in a
    job's log or a piped console (evaluate's) they were noise between its lines."""
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    assert resolve_model("models:/tiny-dense/2").is_dir()
    err = capfd.readouterr().err
    assert "Downloading artifacts" not in err and "%|" not in err, err
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ  # for the download only


def test_a_runs_evaluation_is_read_back_without_a_bar(tmp_path, monkeypatch, capfd):
    """`raytrieve train`'s summary reads the run's evaluation.json: MLflow drew a download bar
    into the job's log (carriage returns; test_job_submit's log check failed on it)."""
    from raytrieve.tracking import mlflow_run

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    client = mlflow_run.client(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    mlflow_run.MetricLogger(uri, run_id).log_evaluation({"eval_cosine_ndcg@10": 0.5})
    capfd.readouterr()
    assert mlflow_run.read_evaluation(uri, run_id) == {"eval_cosine_ndcg@10": 0.5}
    err = capfd.readouterr().err
    assert "Downloading artifacts" not in err and "\r" not in err, err
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ


def test_moving_alias_and_latest_resolve_to_the_version_they_name_now(store):
    from raytrieve.tracking import mlflow_run

    client = mlflow_run.client(store["uri"])
    client.set_registered_model_alias("tiny-dense", "champion", "1")
    assert resolve_model("models:/tiny-dense@champion") == resolve_model("models:/tiny-dense/1")
    # Once the alias moves, the cached download of version 1 must not answer for it.
    client.set_registered_model_alias("tiny-dense", "champion", "2")
    assert resolve_model("models:/tiny-dense@champion") == resolve_model("models:/tiny-dense/2")
    assert resolve_model("models:/tiny-dense/latest") == resolve_model("models:/tiny-dense/2")
    assert resolve_model("models:/tiny-dense/1") != resolve_model("models:/tiny-dense/2")
    np.testing.assert_array_equal(
        _dense(DenseEncoder("models:/tiny-dense@champion", device="cpu")),
        _dense(DenseEncoder(store["folders"][1], device="cpu")),
    )


def test_a_file_store_registry_writes_nothing_outside_the_store(tiny_models, tmp_path, monkeypatch):
    """Training's default store is a folder (file:, ./mlruns). MLflow's file registry reads each
    version's logged model through a client on the process's default store, which in MLflow 3 is
    sqlite:///mlflow.db in the working directory: registering a version (it is read back) or
    reading one must not create that database, nor leave the store set for the process."""
    from raytrieve.tracking import mlflow_run

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = (tmp_path / "mlruns").as_uri()
    versions = []
    for _ in range(2):
        run_id = mlflow_run.start_run(uri, "file-store", "tiny-dense", {}, {})
        mlflow_run.MetricLogger(uri, run_id).log_model_dir(tiny_models["dense"])
        mlflow_run.end_run(uri, run_id, "FINISHED")
        versions.append(mlflow_run.register_model(uri, run_id, "tiny-dense"))
    assert versions == ["1", "2"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    np.testing.assert_array_equal(
        _dense(DenseEncoder("models:/tiny-dense/latest", device="cpu")),
        _dense(DenseEncoder(tiny_models["dense"], device="cpu")),
    )
    assert sorted(p.name for p in cwd.iterdir()) == []
    assert os.environ["MLFLOW_TRACKING_URI"] == uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert mlflow_run.register_model(uri, run_id, "tiny-dense") == "2"  # this run's version, not a third
    assert "MLFLOW_TRACKING_URI" not in os.environ


@pytest.mark.parametrize("make", [DenseEncoder, SparseEncoder, CrossEncoder, resolve_model])
def test_bad_reference_names_it_and_what_is_accepted(make):
    with pytest.raises(ModelLoadError) as info:
        make("no-such-model")
    message = str(info.value)
    assert "'no-such-model'" in message and "no such directory" in message
    assert "models:/NAME/VERSION" in message and "local model folder" in message
    assert "all-minilm-l6-v2" in message  # the shipped variants are listed


def test_load_encoder_fails_as_the_constructor_does():
    with pytest.raises(ModelLoadError, match=r"'no-such-model': no such directory.*models:/NAME/VERSION"):
        load_encoder("sparse", "no-such-model")


def test_unknown_registered_model_names_the_uri_and_the_store(store):
    with pytest.raises(ModelLoadError, match=r"'models:/tiny-dense/7'.*MLflow store at sqlite:///") as info:
        DenseEncoder("models:/tiny-dense/7")
    assert "MLFLOW_TRACKING_URI" in str(info.value)
    with pytest.raises(ModelLoadError, match=r"'models:/tiny-dense/1/extra'.*models:/NAME/VERSION"):
        resolve_model("models:/tiny-dense/1/extra")
    with pytest.raises(ModelLoadError, match=r"'models:/tiny-dense/Production'.*no version"):
        resolve_model("models:/tiny-dense/Production")


def test_a_file_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file, not a model directory"):
        resolve_model(tmp_path / "weights.bin")


def test_folders_and_variants_reach_neither_mlflow_nor_ray(tiny_models):
    """Only an MLflow URI imports MLflow: a constructor given a folder or a shipped variant
    stays inside the library (fresh interpreter: other tests have imported MLflow here)."""
    code = (
        "import json, sys\n"
        "from raytrieve import DenseEncoder\n"
        "DenseEncoder(sys.argv[1], device='cpu'); DenseEncoder('all-minilm-l6-v2', device='cpu')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.partition('.')[0] in ('mlflow', 'ray'))))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tiny_models["dense"])],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_a_changed_architecture_or_converter_revision_converts_again(tmp_path, monkeypatch):
    """A variant's conversion is kept by what the converter reads: the same source, catalogue
    architecture and converter revision reuse it; another architecture in its model.yaml, or a
    bumped ``CONVERSION_REVISION``, converts again into another folder, and the others stay."""
    from raytrieve import assets
    from raytrieve.encoders import convert

    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache"))
    variant = assets.get_variant("splade-tiny")
    real = convert.CONVERTERS[variant.source.format]
    calls = []

    def recording(src, out, arch):
        calls.append(arch)
        real(src, out, arch)

    monkeypatch.setitem(convert.CONVERTERS, variant.source.format, recording)
    first = convert.converted_model(variant)
    assert convert.converted_model(variant) == first and calls == [{}]
    changed = variant.model_copy(update={"source": variant.source.model_copy(update={"architecture": {"x": 1}})})
    second = convert.converted_model(changed)
    assert second != first and calls == [{}, {"x": 1}]
    assert convert.converted_model(changed) == second and len(calls) == 2
    monkeypatch.setattr(assets, "CONVERSION_REVISION", 2)
    third = convert.converted_model(variant)
    assert third not in (first, second) and calls[2:] == [{}]
    assert all((p / "modules.json").exists() for p in (first, second, third))
    # The name before this rule (what earlier encoding jobs kept as model_path): the source's
    # top-level files alone.
    top = assets.top_level_fingerprint(assets.package_dir(variant.source))
    assert assets.converted_folder(variant, legacy=True) == tmp_path / "cache" / "models" / f"splade-tiny-{top}"
    assert first.name.startswith(f"splade-tiny-{top}-")


def test_a_conversion_another_process_finished_first_is_kept(tmp_path, monkeypatch):
    """Two processes converting the same shipped weights at once (encode actors on one node, the
    suite's two processes): the copy renamed into place first stays, the later one is dropped
    rather than swapped in under its readers; a damaged folder there is replaced."""
    from raytrieve import assets
    from raytrieve.encoders import convert

    monkeypatch.setenv("RAYTRIEVE_CACHE", str(tmp_path / "cache"))
    variant = assets.get_variant("splade-tiny")
    real = convert.CONVERTERS[variant.source.format]
    target = assets.converted_folder(variant)
    assert target.parent == tmp_path / "cache" / "models"

    def raced(src, out, arch):  # the other process renames its copy into place meanwhile
        real(src, out, arch)
        if not target.exists():
            shutil.copytree(out, target)
            (target / "first-copy").write_text("")

    monkeypatch.setitem(convert.CONVERTERS, variant.source.format, raced)
    assert convert.converted_model(variant) == target and (target / "first-copy").exists()
    assert not [p for p in target.parent.iterdir() if p != target]  # the later copy is gone
    shutil.rmtree(target)
    target.mkdir()  # damaged: no modules.json
    monkeypatch.setitem(convert.CONVERTERS, variant.source.format, real)
    assert (convert.converted_model(variant) / "modules.json").exists()
