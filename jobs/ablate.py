"""Ray job entrypoint for the ablation grid; takes the flags of `c3ae ablate`.

    ray job submit --working-dir . -- python jobs/ablate.py \
        --data s3://BUCKET/c3ae/utkface --seeds 3 --trial-gpus 0.25 --out s3://BUCKET/c3ae/eval/ablation

Every variant x seed is one Tune trial on the same hash split. Resubmitting the same command resumes it.
"""

import sys

from c3ae_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
