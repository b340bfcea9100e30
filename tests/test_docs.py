"""The docs stay true to the code: the config reference is what the config models generate, and
every config, script and command README.md names exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from raytrieve.cli import build_parser
from raytrieve.config_reference import markdown, rows

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_matches_the_config_models():
    committed = (ROOT / "docs" / "config-reference.md").read_text()
    assert committed.strip() == markdown().strip(), \
        "docs/config-reference.md is stale: raytrieve docs config-reference > docs/config-reference.md"


def test_reference_lists_nested_keys_with_comments_and_defaults():
    from raytrieve.serve.config import ServeConfig

    table = {key: (tp, default, text) for key, tp, default, text in rows(ServeConfig)}
    assert table["limits.max_body_bytes"][1] == str(16 * 2**20)
    assert table["host"][1] == "'127.0.0.1'"
    assert "models:/NAME/VERSION" in table["mlflow_tracking_uri"][2] and table["mlflow_tracking_uri"][1] == "None"
    assert table["dense.model"][1] == "**required**" and "models:/NAME/VERSION" in table["dense.model"][2]


def test_every_config_key_has_a_meaning():
    """README promises every key's type, default and meaning: each row of every section the
    reference lists has its field's description."""
    from raytrieve.config_reference import sections

    blank = [f"{title}: {key}" for title, _, cls in sections() for key, _, _, text in rows(cls) if not text.strip()]
    assert not blank, f"{len(blank)} config key(s) without a Field description: {blank}"


def _model_in(annotation) -> type:
    import typing

    from pydantic import BaseModel

    return next(t for t in (annotation, *typing.get_args(annotation)) if isinstance(t, type) and issubclass(t, BaseModel))


def _constructed_default(cls, key: str) -> str:
    """``key``'s default as pydantic applies it (model_construct: defaults and factories, nothing
    validated), rendered as the reference renders it. A section that is required or defaults to
    None, or an element of a list of mappings, starts from its own class's defaults."""
    from pydantic import BaseModel

    obj = cls.model_construct()
    *path, last = key.split(".")
    for part in path:
        name = part.removesuffix("[]")
        value = getattr(obj, name, None)  # a required section: unset
        nested = isinstance(value, BaseModel) and not part.endswith("[]")
        obj = value if nested else _model_in(type(obj).model_fields[name].annotation).model_construct()
    if not hasattr(obj, last):  # model_construct leaves required fields unset
        return "**required**"
    value = getattr(obj, last)
    return "(see below)" if isinstance(value, BaseModel) else repr(value)


def test_reference_shows_the_default_a_default_constructed_config_has():
    """A section's default_factory may set values other than its class's defaults: the reference
    shows what the config really defaults to, for every documented key of every section."""
    from raytrieve.config_reference import sections

    checked = 0
    for _, _, cls in sections():
        for key, _, default, _ in rows(cls):
            assert default == _constructed_default(cls, key), f"{cls.__name__}: {key}"
            checked += 1
    assert checked > 200
    demo = {key: default for key, _, default, _ in rows(sections()[-1][2])}
    assert demo["sparse_training.learning_rate"] == "5e-05" and demo["dense_training.learning_rate"] == "0.0001"
    assert demo["reranker_training.max_steps"] == "24"
    assert demo["sparse_training.register_as"] == "'demo-pydocs-sparse'"
    from raytrieve.train.config import TrainConfig

    train = {key: default for key, _, default, _ in rows(TrainConfig)}
    assert train["scaling.resources_per_worker"] == "{}" and train["datasets[].loss.args"] == "{}"


def test_readme_names_only_real_files_and_commands():
    readme = (ROOT / "README.md").read_text()
    paths = set(re.findall(r"\b((?:jobs|cluster|benchmarks|docs)/[\w./-]+\.(?:yaml|py|sh|md|png))\b", readme))
    assert paths, "README names no files?"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README.md names files that do not exist: {missing}"
    parser = build_parser()
    commands = re.findall(r"^\s*(?:\$ )?raytrieve ([^\n#]+)", readme, flags=re.M)
    assert commands
    for command in commands:
        argv = shlex.split(command.rstrip("\\ "))
        if argv[0] in {"train", "encode", "mine", "serve", "demo", "index", "data", "models", "docs", "evaluate"}:
            parser.parse_args(argv)  # SystemExit on an unknown command or flag


def test_demo_results_page_is_the_report_of_its_json():
    """docs/demo-results.md is the demo's report of docs/demo-results.json (both from one run);
    a stage one phase did not time shows "-"."""
    import json

    from raytrieve.demo.report import markdown as report_markdown

    rep = json.loads((ROOT / "docs" / "demo-results.json").read_text())
    page = (ROOT / "docs" / "demo-results.md").read_text()
    assert page == report_markdown(rep) + "\n![before and after fine-tuning](demo-results.png)\n"
    assert "nan" not in page
    # A stage one phase did not time shows "-" (a run may look texts up in one phase only).
    for gone, shown in (("before", "lookup - / 12"), ("after", "lookup 12 / -")):
        one = json.loads(json.dumps(rep))
        one["timings_p50_ms"][gone].pop("lookup_ms", None)
        one["timings_p50_ms"]["after" if gone == "before" else "before"]["lookup_ms"] = 12.0
        assert shown in report_markdown(one) and "nan" not in report_markdown(one), gone


def test_the_readmes_minimal_encode_config_is_a_whole_config():
    """The three-key config README.md gives for your own corpus validates as it stands, and
    its comments name the defaults it relies on."""
    import yaml

    from raytrieve.config import from_dict
    from raytrieve.inference.config import EncodeConfig

    readme = (ROOT / "README.md").read_text()
    block = readme.split("A config for your own corpus", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = from_dict(EncodeConfig, yaml.safe_load(block), "README.md").check("README.md")
    assert (cfg.corpus.id_column, cfg.corpus.text_column) == ("id", "text")
    assert "columns id and text" in block and cfg.dense is not None and cfg.dense.model == "all-minilm-l6-v2"


def test_the_lock_pins_every_dependency_within_pyprojects_ranges_and_the_venv_has_it():
    """constraints.txt (what `make venv` installs with) pins each of pyproject.toml's dependencies
    and test extras, with the pyproject range admitting the pin (a range edited without `make
    lock` fails here), one pin per package; and this venv, on the lock's Python, has the pins."""
    import importlib.metadata
    import sys
    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the lock's Python has it)

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[A-Za-z0-9._-]+", name) and version, f"constraints.txt: {line!r} is no pin"
            assert canonicalize_name(name) not in pins, f"constraints.txt pins {name} twice"
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock_python = re.search(r"^LOCK_PYTHON := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert lock_python, "Makefile: LOCK_PYTHON"
    on_lock_python = f"{sys.version_info[0]}.{sys.version_info[1]}" == lock_python.group(1)
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt has no pin for {req.name}: run make lock"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {spec!r}: run make lock"
        if not on_lock_python:
            continue  # make venv installed from the ranges (checked above to admit the pins)
        installed = Version(importlib.metadata.version(req.name))
        assert Version(installed.base_version if name == "torch" else str(installed)) == Version(pins[name]), \
            f"this venv has {req.name} {installed}, the lock {pins[name]}: make venv installs the lock"
