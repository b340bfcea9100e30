"""What ``raytrieve train`` and ``jobs/train.py`` share: load the config, run, print the result."""

from __future__ import annotations

import json
import logging
import sys

from raytrieve.errors import RaytrieveError


def train_from_args(config: str, overrides: list[str], ray_address: str | None) -> int:
    from raytrieve.train.config import load_train_config
    from raytrieve.train.run import run_training

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_train_config(config, overrides)
        result = run_training(cfg, where=config, ray_address=ray_address)
    except RaytrieveError as e:
        print(f"raytrieve train: error: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "output_dir": result.output_dir,
                "steps": result.steps,
                "mlflow_run_id": result.run_id,
                "model_version": result.model_version,
                "not_trained_on": result.dropped,
            }
        )
    )
    return 0
