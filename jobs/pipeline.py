"""Ray job entrypoint for the whole recipe; takes the flags of `c3ae pipeline` (--config YAML).

    ray job submit --submission-id c3ae-pipeline --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/pipeline.py --config jobs/pipeline.yaml

IMDB-WIKI preprocessing -> pretraining -> fine-tuning -> FG-NET evaluation -> model file, each step under
the config's out. Resubmitting the same config (after `ray job delete c3ae-pipeline`, since Ray keeps
one job per submission id) skips the complete steps and resumes the rest.
"""

import sys

from c3ae_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
