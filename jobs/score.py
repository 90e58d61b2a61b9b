"""Ray job entrypoint for batch scoring; takes the flags of `c3ae score`.

    ray job submit --working-dir . -- python jobs/score.py \
        --input s3://BUCKET/photos --model s3://BUCKET/c3ae/runs/utkface/model.pt --out s3://BUCKET/c3ae/scores

Inside a Ray job RAY_ADDRESS is set, so the stage runs on the job's cluster.
"""

import sys

from c3ae_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
