"""Typed config loading, the models catalogue and the command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field, model_validator

from raytrieve.config import ConfigModel, from_dict, invalid, load_yaml, parse_overrides
from raytrieve.errors import AssetError, ConfigError

ROOT = Path(__file__).resolve().parents[1]


class Inner(ConfigModel):
    lr: float = 1e-4
    names: list[str] = Field(default_factory=list)


class Outer(ConfigModel):
    name: str
    inner: Inner = Field(default_factory=Inner)
    steps: int | None = None


def test_from_dict_builds_nested_and_checks_types(tmp_path):
    cfg = from_dict(Outer, {"name": "x", "inner": {"lr": 3, "names": ["a"]}, "steps": 5})
    assert cfg.inner.lr == 3.0 and cfg.inner.names == ["a"] and cfg.steps == 5
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lrr'\]; valid keys are \['lr', 'names'\]"):
        from_dict(Outer, {"name": "x", "inner": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"config.inner.lr: expected a number, got 'fast'"):
        from_dict(Outer, {"name": "x", "inner": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        from_dict(Outer, {})
    with pytest.raises(ConfigError, match="steps"):
        from_dict(Outer, {"name": "x", "steps": True})


class Either(ConfigModel):
    prompts: str | dict[str, str] | None = None
    low: int = 0
    high: int = 1

    @model_validator(mode="after")
    def _ordered(self) -> Either:
        if self.low > self.high:
            invalid("low", f" ({self.low}) must be <= high ({self.high})")
        return self


def test_union_errors_say_why_each_alternative_failed_and_validators_name_the_key():
    with pytest.raises(ConfigError, match=r"c.yaml.prompts \(as str\): expected a string, got 5; "
                                          r"c.yaml.prompts \(as dict\[str,str\]\): expected a mapping, got 5"):
        from_dict(Either, {"prompts": 5}, "c.yaml")
    with pytest.raises(ConfigError, match=r"prompts \(as dict\[str,str\]\).q: expected a string, got 1"):
        from_dict(Either, {"prompts": {"q": 1}})
    with pytest.raises(ConfigError, match=r"^c.yaml.low \(3\) must be <= high \(1\)$"):
        from_dict(Either, {"low": 3}, "c.yaml")
    assert from_dict(Either, {"low": 1}).check().low == 1
    with pytest.raises(ConfigError, match=r"c.yaml.high: expected an integer, got True"):  # strict: no bool as int
        from_dict(Either, {"high": True}, "c.yaml")


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: base\ninner:\n  lr: 0.1\n")
    cfg = load_yaml(Outer, path, ["inner.lr=2e-5", "steps=10"])
    assert cfg.inner.lr == 2e-5 and cfg.steps == 10 and cfg.name == "base"
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}
    # Text that YAML would read as a block mapping or list stays text (the e5 prompt "query: "
    # became {"query": None}); scalars and flow collections are YAML's.
    got = parse_overrides(["p.q=query: ", "p.d=passage: x", "l=- a", "t=a: b: c", "n=null", "f=[1, {a: 2}]", "e="])
    assert got == {"p": {"q": "query: ", "d": "passage: x"}, "l": "- a", "t": "a: b: c", "n": None,
                   "f": [1, {"a": 2}], "e": ""}
    # YAML's scalars; text YAML would read otherwise (YAML 1.1's bools, numbers and dates,
    # comments, bare anchors, a broken quote) stays text as written.
    cases = {"Query #1: ": "Query #1: ", "#x": "#x", "&x": "&x", "|": "|", "no": "no", "on": "on", "True": True,
             "false": False, "~": None, "0755": "0755", "-010": "-010", "0": 0, "1_000": "1_000", "1:30": "1:30", "2024-01-01": "2024-01-01",
             ".5": 0.5, "-3": -3, "+5": 5, "1.": 1.0, "-.inf": float("-inf"), "1e-4": "1e-4", "08": "08",
             "12e4567": "12e4567", "'quoted: yes'": "quoted: yes", '"x #1"': "x #1", "'s-Hertogenbosch": "'s-Hertogenbosch",
             '"a" b': '"a" b', " padded ": " padded "}
    assert {raw: parse_overrides([f"k={raw}"])["k"] for raw in cases} == cases
    with pytest.raises(ConfigError, match=r"^override 'f=\[1, 2': the value is not a YAML list or mapping \("):
        parse_overrides(["f=[1, 2"])
    # A number field reads numeric text (YAML reads 1e-4 as text); a text field keeps "08".
    path.write_text("name: base\ninner:\n  lr: 0.1\n")
    cfg = load_yaml(Outer, path, ["inner.lr=1e-4", "name=08"])
    assert cfg.inner.lr == 1e-4 and cfg.name == "08"
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides(["novalue"])
    with pytest.raises(ConfigError, match=f"{path.name}.name"):
        load_yaml(Outer, path, ["name=[1, 2]"])


def test_an_override_that_sets_a_wrong_key_is_named_as_its_source(tmp_path):
    """The file path locates the key; the override, not the file, is what to fix."""
    path = tmp_path / "c.yaml"
    path.write_text("name: base\ninner:\n  lr: 0.1\n")
    cases = {
        ("inner.lr=fast",): r"c.yaml.inner.lr: expected a number, got 'fast' \(set by the override inner.lr=fast\)$",
        ("steps=2", "inner.lrr=1"): r"c.yaml.inner: unknown key\(s\) \['lrr'\]; valid keys are \['lr', 'names'\] "
        r"\(set by the override inner.lrr=1\)$",
        ("outer.lr=1",): r"c.yaml: unknown key\(s\) \['outer'\].* \(set by the override outer.lr=1\)$",
        # A valid key set beside a misspelt one is not blamed (it is in the valid keys' list).
        ("inner.lr=0.2", "inner.lrr=1"): r"c.yaml.inner: unknown key\(s\) \['lrr'\]; valid keys are \['lr', "
        r"'names'\] \(set by the override inner.lrr=1\)$",
        # A key under a plain value makes it a mapping: the value's error names the override.
        ("inner.lr.x=5",): r"c.yaml.inner.lr: expected a number, got \{'x': 5\} \(set by the override inner.lr.x=5\)$",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_yaml(Outer, path, list(overrides))
    path.write_text("name: base\ninner:\n  lr: slow\n")  # the file's own mistake names no override
    with pytest.raises(ConfigError, match=r"c.yaml.inner.lr: expected a number, got 'slow'$"):
        load_yaml(Outer, path, ["steps=3"])
    path.write_text("name: base\ninner:\n  lrr: 0.1\n")  # a typo in the file, a right key overridden
    with pytest.raises(ConfigError, match=r"c.yaml.inner: unknown key\(s\) \['lrr'\]; valid keys are \['lr', 'names'\]$"):
        load_yaml(Outer, path, ["inner.lr=0.3"])


def test_overrides_address_list_items_by_index(tmp_path):
    from raytrieve.train.config import load_train_config

    shipped = ROOT / "jobs" / "configs" / "dense_mnrl.yaml"
    cfg = load_train_config(shipped, ["datasets.0.path=/abs/train.parquet", "datasets.0.loss.args.scale=30"])
    (dataset,) = cfg.datasets
    assert dataset.path == "/abs/train.parquet" and dataset.loss.args == {"scale": 30}
    assert dataset.columns == ["query", "document"] and dataset.loss.name == "MultipleNegativesRankingLoss"
    with pytest.raises(ConfigError, match=r"override datasets.3: datasets has 1 item\(s\)"):
        load_train_config(shipped, ["datasets.3.path=x"])


def test_catalogue_lists_three_kinds():
    from raytrieve import assets

    v = assets.variants()
    assert {name: x.kind for name, x in v.items()} == {
        "all-minilm-l6-v2": "dense",
        "splade-tiny": "sparse",
        "ms-marco-minilm-l12-v2": "cross",
    }
    assert all(x.card is not None and x.card.exists() for x in v.values())
    with pytest.raises(AssetError, match="shipped variants"):
        assets.get_variant("gpt-5")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "raytrieve.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


def test_a_mistyped_flag_is_named_by_its_commands_usage_with_the_closest_option(capsys):
    """`evaluate --spilt test` printed the top-level usage (raytrieve [-h] {models,cache,...})
    and "unrecognized arguments", naming neither the command nor --split (helper-85)."""
    from raytrieve.cli import main

    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--data", "beir", "--dense", "m", "--spilt", "test"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: raytrieve evaluate ")
    assert "raytrieve evaluate: error: unrecognized arguments: --spilt (did you mean --split?)" in err
    with pytest.raises(SystemExit):
        main(["cache", "list", "--jsno=1", "extra"])
    assert "raytrieve cache list: error: unrecognized arguments: --jsno (did you mean --json?) extra" in (
        capsys.readouterr().err)


def test_cli_models_list_and_path():
    out = _cli("models", "list")
    assert out.returncode == 0, out.stderr
    assert "splade-tiny" in out.stdout and "ms-marco-minilm-l12-v2" in out.stdout
    for name in ("all-minilm-l6-v2", "splade-tiny", "ms-marco-minilm-l12-v2"):
        res = _cli("models", "path", name)
        assert res.returncode == 0, res.stderr
        folder = Path(res.stdout.strip().splitlines()[-1])
        assert (folder / "modules.json").exists(), folder
    bad = _cli("models", "path", "nope")
    assert bad.returncode == 2 and "unknown model variant 'nope'" in bad.stderr


def test_importing_raytrieve_is_light():
    code = "import raytrieve, sys; print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
    code = "import raytrieve.encoders, sys; print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.parametrize("job,config", [("train", "dense_mnrl.yaml"), ("encode", "encode_pydocs.yaml"),
                                        ("mine", "mine_pydocs.yaml")])
def test_job_scripts_and_cli_report_a_config_error_alike(job, config):
    """`python jobs/<job>.py` (as `ray job submit` runs it, from the checkout) and `raytrieve <job>`
    load the config the same way: an unknown override is one error line naming it, exit status 2,
    reported before the job imports torch, transformers or Ray (~5 s of imports on 2 cores)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ["--config", f"jobs/configs/{config}", "no_such_field=1"]
    script = subprocess.run([sys.executable, f"jobs/{job}.py", *args], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=300)
    cli = _cli(job, *args)
    for out in (script, cli):
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith(f"raytrieve {job}: error: ") and "no_such_field" in out.stderr, out.stderr
        assert out.stdout == ""
    assert script.stderr == cli.stderr
    code = ("import sys\nfrom raytrieve.jobs_entry import run_job\n"
            f"assert run_job({job!r}, 'jobs/configs/{config}', ['no_such_field=1'], None) == 2\n"
            "print(sorted(m for m in ('torch', 'transformers', 'ray', 'mlflow') if m in sys.modules))\n")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


def test_serve_reports_a_config_error_before_loading_ray():
    """`raytrieve serve` with an unknown key: one error line naming it, exit status 2, and neither
    Ray (Serve's import alone is ~2 s on 2 cores) nor torch loaded to say so."""
    out = _cli("serve", "--config", "jobs/configs/serve_pydocs.yaml", "no_such_field=1")
    assert out.returncode == 2 and out.stdout == "", out.stderr
    assert out.stderr.startswith("raytrieve serve: error: jobs/configs/serve_pydocs.yaml: unknown key(s) ['no_such_field']")
    code = ("import sys\nfrom raytrieve.cli import main\n"
            "assert main(['serve', '--config', 'jobs/configs/serve_pydocs.yaml', 'no_such_field=1']) == 2\n"
            "print(sorted(m for m in ('torch', 'transformers', 'ray', 'mlflow') if m in sys.modules))\n")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


@pytest.mark.parametrize("job", ["train", "encode", "mine", "serve"])
def test_a_config_that_is_a_folder_or_not_text_is_named_not_a_traceback(job, tmp_path, capsys):
    """`--config` naming a folder (or a binary file) was an IsADirectoryError (UnicodeDecodeError)
    traceback with exit status 1; it is one error line naming the path and the fix, status 2."""
    from raytrieve.cli import main

    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x80\x81\xfe\xff" * 4)
    for path, said in ((tmp_path, "is a folder; give a YAML config file"),
                       (binary, "not a text file in UTF-8 (invalid start byte at byte 0); give a YAML config file")):
        assert main([job, "--config", str(path)]) == 2
        out = capsys.readouterr()
        assert out.err.startswith(f"raytrieve {job}: error: {path}: {said}"), out.err
        assert out.err.count("\n") == 1 and "Traceback" not in out.err and out.out == ""


@pytest.mark.parametrize("job,config,field", [("train", "dense_mnrl.yaml", "model.name_or_path"),
                                              ("encode", "encode_pydocs.yaml", "sparse.model"),
                                              ("mine", "mine_pydocs.yaml", "retriever.model"),
                                              ("mine", "mine_pydocs.yaml", "reranker.model")])
def test_a_model_that_is_not_there_is_named_by_its_field_before_torch_loads(job, config, field):
    """A model name that is no folder, no shipped variant and no MLflow URI: one error naming the
    config's field and what a model may be, exit status 2, and nothing heavy imported to say so
    (each job checked its models only after importing torch and transformers, ~5 s)."""
    code = ("import sys\nfrom raytrieve.jobs_entry import run_job\n"
            f"assert run_job({job!r}, 'jobs/configs/{config}', ['{field}=no-such-model'], None) == 2\n"
            "print(sorted(m for m in ('torch', 'transformers', 'ray', 'mlflow') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    assert out.stderr.startswith(f"raytrieve {job}: error: jobs/configs/{config}.{field}: model 'no-such-model': "
                                 "no such directory, not an MLflow model URI and not a shipped variant"), out.stderr


def test_a_training_file_or_column_that_is_not_there_is_named_before_torch_loads(tmp_path):
    """`raytrieve train` named a missing data file or column only after importing torch and
    transformers (~5-7 s); now in about a second, with nothing heavy imported, and the same
    message run_training gives (naming the config's dataset, the file and the fix)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"query": ["q"], "document": ["d"]}), data)
    for override, message in (
        (f"datasets.0.path={tmp_path / 'nope.parquet'}", f"{tmp_path / 'nope.parquet'} does not exist; fix datasets[].path"),
        ("datasets.0.columns=[query,doc]", f"column(s) ['doc'] not in {data}; columns are ['query', 'document']"),
    ):
        code = ("import sys\nfrom raytrieve.jobs_entry import run_job\n"
                f"assert run_job('train', 'jobs/configs/dense_mnrl.yaml', ['datasets.0.path={data}', {override!r}],"
                " None) == 2\n"
                "print(sorted(m for m in ('torch', 'transformers', 'ray', 'mlflow') if m in sys.modules))\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
        assert out.stderr.startswith("raytrieve train: error: jobs/configs/dense_mnrl.yaml.datasets[0] (pydocs): ")
        assert message in out.stderr, out.stderr


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_end_a_command_with_one_line_not_a_traceback(monkeypatch, capsys, tmp_path, signame):
    """Ctrl-C in encode or mine printed a 35-40 line KeyboardInterrupt traceback; SIGTERM (`ray job
    stop`, `kill`) ended a command through Ray's handler, silently with status 15. A real signal
    to this process, sent from inside the command; the SIGTERM handler before it is put back."""
    import signal
    import time

    import raytrieve.index.build as build
    from raytrieve.cli import main

    signum = getattr(signal, signame)

    def signalled(*_a, **_k):
        os.kill(os.getpid(), signum)
        time.sleep(10)  # the handler raises in this thread well before
        raise AssertionError(f"{signame} did not interrupt the command")

    monkeypatch.setattr(build, "build_indices", signalled)
    before = signal.getsignal(signal.SIGTERM)
    try:
        code = main(["index", "build", "--vectors", str(tmp_path), "--out", str(tmp_path / "i")])
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 128 + signum
    name = "Ctrl-C" if signame == "SIGINT" else "SIGTERM"
    assert capsys.readouterr().err == (f"raytrieve index build: interrupted ({name}); finished work is kept (encode, "
                                       "mine and train resume it on a rerun)\n")


def test_the_commands_log_without_faiss_loader_noise():
    """Every FAISS-backed evaluate printed "INFO faiss.loader: Could not load library with AVX2
    support due to: ModuleNotFoundError(...)" (its loader tries each SIMD build in turn)."""
    import subprocess
    import sys

    def stderr(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr

    assert "faiss.loader" in stderr("import logging; logging.basicConfig(level=logging.INFO); import faiss")
    assert stderr("from raytrieve.progress import configure_logging; configure_logging(); import faiss") == ""


@pytest.mark.parametrize(("config", "override", "key"), [
    ("mine_pydocs.yaml", "output_path", "output_path"),
    ("demo.yaml", "out_dir", "out_dir"),
])
def test_a_uri_where_a_path_on_disk_is_written_or_mapped_is_refused_by_its_key(config, override, key, tmp_path):
    """Mining's output and the demo's folders live on a local or shared disk: a URI there was taken as
    a relative path (mining's triplets went to a local file ``s3:/bucket/...``). Each shipped
    config with a URI at that key is refused by name when it loads, before any work. (Training's
    output_dir and Serve's indices may be URIs: tests/test_object_store.py.)"""
    from raytrieve.demo.config import load_demo_config
    from raytrieve.inference.config import load_mine_config

    load = {"mine_pydocs.yaml": load_mine_config, "demo.yaml": load_demo_config}[config]
    path = str(Path(__file__).resolve().parent.parent / "jobs" / "configs" / config)
    load(path, [f"{override}={tmp_path}/x.parquet"])  # a path loads
    with pytest.raises(ConfigError, match=rf"\.{re.escape(key)} s3://bucket/x.parquet: a URI, but this is written or read on "
                                          r"a local or shared disk \(a path that every node reaches\)"):
        load(path, [f"{override}=s3://bucket/x.parquet"])


def test_a_uri_for_an_output_flag_is_refused_by_the_flag(tmp_path):
    """evaluate's --out and --index (`index build --out` may be a URI: tests/test_object_store.py)."""
    import argparse

    from raytrieve.evaluate.command import add_arguments, evaluate

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for flag in ("--out", "--index"):  # refused before any data or model is read
        args = parser.parse_args(["--data", str(tmp_path), "--dense", "all-minilm-l6-v2", flag, f"s3://bucket/{flag}"])
        with pytest.raises(ConfigError, match=rf"^{flag} s3://bucket/{flag}: a URI, but this is written or read on a "):
            evaluate(args)
