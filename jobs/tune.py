"""Ray job entrypoint for the recipe search; takes the flags of `c3ae tune`.

    ray job submit --working-dir . -- python jobs/tune.py \
        --data s3://BUCKET/c3ae/utkface --space c3ae_ray/pretrained/search_space.yaml \
        --base c3ae_ray/pretrained/utkface.yaml --trials 24 --epochs 10 --out s3://BUCKET/c3ae/search

Each recipe is one Tune trial, spread over the job's cluster with --trial-cpus/--trial-gpus. Use shared storage
(s3://...) for --out on a multi-node cluster; resubmitting the same command resumes the search.
"""

import sys

from c3ae_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
