"""Hard-negative mining entry point for ``ray job submit`` (the cluster's Ray is joined, not started):

    ray job submit --working-dir . --runtime-env-json '{"py_modules": ["platform/raytrieve"]}' \\
        -- python jobs/mine.py --config jobs/configs/mine_pydocs.yaml [key=value ...]

The corpus encoding inside is resumable: run the same command again after a failure.
"""

import sys

from raytrieve.jobs_entry import job_main

if __name__ == "__main__":
    sys.exit(job_main("mine", __doc__))
