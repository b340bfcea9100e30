"""Training entry point for ``ray job submit`` (the cluster's Ray is joined, not started):

    ray job submit --working-dir . --runtime-env-json '{"py_modules": ["platform/raytrieve"]}' \\
        -- python jobs/train.py --config jobs/configs/dense_mnrl.yaml [key=value ...]
"""

import sys

from raytrieve.jobs_entry import job_main

if __name__ == "__main__":
    sys.exit(job_main("train", __doc__))
