"""Retrieval evaluation entry point for ``ray job submit`` (the cluster's Ray is joined, not
started), for corpora the encoding job encodes on the cluster:

    ray job submit --working-dir . --runtime-env-json '{"py_modules": ["platform/raytrieve"]}' \\
        -- python jobs/evaluate.py --data /shared/beir/scifact --dense all-minilm-l6-v2 --sparse splade-tiny \\
           --reranker ms-marco-minilm-l12-v2 --out /shared/eval/scifact

The arguments are `raytrieve evaluate`'s (python jobs/evaluate.py --help).
"""

import argparse
import sys

from raytrieve.errors import RaytrieveError
from raytrieve.evaluate.command import add_arguments, main
from raytrieve.jobs_entry import interrupted, sigterm_as_interrupt

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args()
    try:
        with sigterm_as_interrupt():  # `ray job stop` ends it as Ctrl-C does
            code = main(args, ray_address=None)
    except RaytrieveError as e:
        print(f"raytrieve evaluate: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = interrupted("raytrieve evaluate")
    sys.exit(code)
