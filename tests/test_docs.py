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
    assert table["limits.max_body_bytes"][1] == "1000000"
    assert table["host"][1] == "'127.0.0.1'"
    assert "models:/NAME/VERSION" in table["mlflow_tracking_uri"][2] and table["mlflow_tracking_uri"][1] == "None"
    assert table["dense.model"][1] == "**required**" and "models:/NAME/VERSION" in table["dense.model"][2]


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
