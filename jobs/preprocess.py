"""Ray job entrypoint for preprocessing; takes the flags of `c3ae preprocess`.

    ray job submit --working-dir . -- python jobs/preprocess.py \
        --dataset wiki --root /data/wiki_crop --out s3://BUCKET/c3ae/wiki

Inside a Ray job RAY_ADDRESS is set, so the stage runs on the job's cluster.
"""

import sys

from c3ae_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
