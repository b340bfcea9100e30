"""Hard-negative mining entry point for ``ray job submit`` (the cluster's Ray is joined, not started):

    ray job submit --working-dir . --runtime-env-json '{"py_modules": ["platform/raytrieve"]}' \\
        -- python jobs/mine.py --config jobs/configs/mine_pydocs.yaml [key=value ...]

The corpus encoding inside is resumable: run the same command again after a failure.
"""

import argparse
import sys

from raytrieve.inference.entry import mine_from_args

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    sys.exit(mine_from_args(args.config, args.overrides, ray_address=None))
