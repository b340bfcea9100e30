"""What ``raytrieve encode|mine`` and ``jobs/encode.py|mine.py`` share: load the config, run,
print the result as one JSON line."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict

from raytrieve.errors import RaytrieveError


def encode_from_args(config: str, overrides: list[str], ray_address: str | None) -> int:
    from raytrieve.inference.config import load_encode_config
    from raytrieve.inference.encode import run_encode

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_encode(load_encode_config(config, overrides), where=config, ray_address=ray_address)
    except RaytrieveError as e:
        print(f"raytrieve encode: error: {e}", file=sys.stderr)
        return 2
    if result.already_complete:
        print(f"{result.output_dir}: already complete ({result.rows} rows, {result.shards} shards); nothing to do",
              file=sys.stderr)
    print(json.dumps(asdict(result)))
    return 0


def mine_from_args(config: str, overrides: list[str], ray_address: str | None) -> int:
    from raytrieve.inference.config import load_mine_config
    from raytrieve.inference.mine import run_mine

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_mine(load_mine_config(config, overrides), where=config, ray_address=ray_address)
    except RaytrieveError as e:
        print(f"raytrieve mine: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result)))
    return 0
