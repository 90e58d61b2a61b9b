"""Ray job entrypoint for pretraining (from scratch, e.g. on IMDB-WIKI); takes the flags of `c3ae train`.

    ray job submit --submission-id c3ae-pretrain-wiki --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/pretrain.py --data s3://BUCKET/c3ae/data/wiki --out s3://BUCKET/c3ae/runs/pretrain --workers 4 --gpu

Inside a Ray job RAY_ADDRESS is set, so the stage runs on the job's cluster. A multi-node run needs --out
on shared storage (s3://...): every worker writes its checkpoints there. Resubmitting the same command
resumes an unfinished run from its latest checkpoint.
"""

import sys

from c3ae_ray.cli import main

if __name__ == "__main__":
    if "--init-from" in sys.argv:
        sys.exit("jobs/pretrain.py trains from scratch: use jobs/finetune.py to start from a model")
    sys.exit(main(["train", *sys.argv[1:]]))
