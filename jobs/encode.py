"""Corpus encoding entry point for ``ray job submit`` (the cluster's Ray is joined, not started):

    ray job submit --working-dir . --runtime-env-json '{"py_modules": ["platform/raytrieve"]}' \\
        -- python jobs/encode.py --config jobs/configs/encode_pydocs.yaml [key=value ...]

Killed or failed, run the same command again: finished shards are kept and skipped.
"""

import sys

from raytrieve.jobs_entry import job_main

if __name__ == "__main__":
    sys.exit(job_main("encode", __doc__))
