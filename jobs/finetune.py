"""Ray job entrypoint for fine-tuning a model (e.g. the IMDB-WIKI one on UTKFace); takes the flags of
`c3ae train` and needs --init-from.

    ray job submit --submission-id c3ae-finetune-utkface --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/finetune.py --init-from s3://BUCKET/c3ae/runs/pretrain/model.pt \
        --data s3://BUCKET/c3ae/data/utkface --out s3://BUCKET/c3ae/runs/finetune --workers 4 --gpu

Resubmitting the same command resumes an unfinished run from its latest checkpoint.
"""

import sys

from c3ae_ray.cli import main

if __name__ == "__main__":
    if "--init-from" not in sys.argv:
        sys.exit("jobs/finetune.py needs --init-from MODEL (a model.pt from pretraining)")
    sys.exit(main(["train", *sys.argv[1:]]))
