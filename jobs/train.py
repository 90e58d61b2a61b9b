"""Ray job entrypoint for training; takes the flags of `c3ae train`.

    ray job submit --working-dir . -- python jobs/train.py \
        --data s3://BUCKET/c3ae/wiki --out s3://BUCKET/c3ae/runs/wiki --workers 4 --gpu

Inside a Ray job RAY_ADDRESS is set, so the stage runs on the job's cluster. A multi-node run needs --out
on shared storage (s3://...): every worker writes its checkpoints there. Resubmitting the same command
resumes an unfinished run from its latest checkpoint.
"""

import sys

from c3ae_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
