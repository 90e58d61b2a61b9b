"""Ray job entrypoint for the FG-NET protocols; takes the flags of `c3ae evaluate`.

    ray job submit --working-dir . -- python jobs/evaluate.py \
        --data s3://BUCKET/c3ae/fgnet --protocol lopo --init-from s3://BUCKET/c3ae/runs/wiki/model.pt \
        --trial-cpus 0.5 --out s3://BUCKET/c3ae/eval/fgnet-lopo

Each split or fold is one Tune trial, spread over the job's cluster with --trial-cpus/--trial-gpus. Use
shared storage (s3://...) for --out on a multi-node cluster; resubmitting the same command resumes it.
"""

import sys

from c3ae_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
