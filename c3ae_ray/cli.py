"""The `c3ae` command: parse arguments, build a stage's config, call the stage, print its summary. No logic here.

Every stage command builds its config one way (`config.build`): the dataclass's defaults <- an optional
`--config` YAML <- the flags given. A flag names the config field it sets (nested fields with a dot, such as
`detector.min_face_score`), and its help shows the dataclass's default, so no default is written twice.
A `UserError` prints one line and exits 1; anything else is a bug: a first line says so, then the traceback, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback

from c3ae_ray import __version__
from c3ae_ray.config import UserError, build, field_default, load_yaml, merge, nest

NOT_FIELDS = {"command", "run", "config", "stage"}  # namespace entries that are no config fields


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _score_or_off(text: str) -> float | None:
    """IMDB-WIKI's face_score filter: a negative value turns it off."""
    value = float(text)
    return None if value < 0 else value


class _Command:
    """One subcommand whose flags set fields of its stage's config dataclass."""

    def __init__(self, commands, name: str, cls, run, help: str, description: str, config_flag: bool = True):
        self.cls = cls
        self.required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        self.parser = commands.add_parser(name, help=help, description=description)
        self.parser.set_defaults(run=run, stage=self)
        if config_flag:
            self.parser.add_argument("--config", help="YAML with this command's settings (flags override it)")

    def flag(self, flag: str, field: str, help: str = "", **options) -> "_Command":
        """A flag for `field`: absent unless given, its help ends with the dataclass's default."""
        default, name = field_default(self.cls, field), field.rsplit(".", 1)[-1]
        if field in self.required:
            note = "required, as a flag or in --config"
        elif options.get("action") == "store_const" or dataclasses.is_dataclass(default):
            note = f"default: {name} {'on' if default else 'off'}"  # a switch that turns a field off
        elif isinstance(default, bool):
            note = f"default: {'on' if default else 'off'}"
        else:
            note = f"default: {'none' if default is None else ' '.join(map(str, default)) if isinstance(default, tuple) else default}"
        if "action" not in options:
            options.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
        self.parser.add_argument(flag, dest=field, default=argparse.SUPPRESS, help=f"{help} ({note})".lstrip(), **options)
        return self

    def detection_flags(self) -> "_Command":
        """Where the detector runs and what counts as a face: the same flags in every stage that detects."""
        return (self.flag("--device", "device", choices=DEVICES)
                .flag("--min-face-score", "detector.min_face_score", "MTCNN probability for a face to count", type=float)
                .flag("--min-face-size", "detector.min_face_size", "smallest face looked for, in pixels", type=_positive_int))

    def progress_flag(self) -> "_Command":
        """The batch stages' progress line interval."""
        return self.flag("--progress-interval", "progress_s", "seconds between progress lines (0: none)", type=float)

    def config(self, args: argparse.Namespace):
        """Defaults <- --config YAML <- the flags given -> the stage's config; a missing required field names its flag."""
        given = nest({k: v for k, v in vars(args).items() if k not in NOT_FIELDS})
        values = merge(load_yaml(getattr(args, "config", None)), given)
        flags = {action.dest: action.option_strings[0] for action in self.parser._actions if action.option_strings}
        missing = [flags.get(name, name) for name in sorted(self.required - set(values))]
        if missing:
            raise UserError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (as flags or in --config)")
        return build(self.cls, values, args.command)


# ---- what each command runs ----


def _summary(args) -> int:
    from c3ae_ray.summary import summary_text

    print(summary_text())
    return 0


def _preprocess(args) -> int:
    from c3ae_ray.preprocess import format_summary, preprocess

    print(format_summary(preprocess(args.stage.config(args))))
    return 0


def _train(args) -> int:
    from c3ae_ray.train import format_summary, train

    print(format_summary(train(args.stage.config(args))))
    return 0


def _evaluate(args) -> int:
    from c3ae_ray.protocols import format_report
    from c3ae_ray.evaluate import evaluate

    if args.command == "ablate":
        args.protocol = "ablation"
    summary = evaluate(args.stage.config(args))
    print(format_report(summary))
    print(f"report: {summary['out']}/report.md, summary.json, trial_mae.png, pred_vs_true.png, error_by_decade.png")
    if summary["failed"]:
        print(f"c3ae {args.command}: {summary['failed']} of {summary['trials']} trials failed (listed in the report)", file=sys.stderr)
        return 1
    return 0


def _tune(args) -> int:
    from c3ae_ray.tune import format_report, tune_recipe

    summary = tune_recipe(args.stage.config(args))
    print(format_report(summary), end="")
    if summary["best"] is not None:
        print(f"best recipe: {summary['out']}/best.yaml (c3ae train --config {summary['out']}/best.yaml --out RUN_DIR)")
    return 0


def _score(args) -> int:
    from c3ae_ray.score import format_summary, score

    print(format_summary(score(args.stage.config(args))))
    return 0


def _predict(args) -> int:
    import json

    from c3ae_ray.predict import format_results, predict_files

    cfg = args.stage.config(args)
    results = predict_files(cfg)
    print(json.dumps(results, indent=2) if cfg.json else format_results(results))
    if all(result["error"] for result in results):
        print(f"c3ae predict: none of the {len(results)} file(s) could be read", file=sys.stderr)
        return 1
    return 0


def _export(args) -> int:
    from c3ae_ray.export import export_model

    summary = export_model(args.model, args.format, args.out)
    print(
        f"{summary['out']}: {summary['format']}, {summary['bytes']:,} bytes; against PyTorch the ages differ by at most "
        f"{summary['max_age_difference']:.2g} years, the distributions by {summary['max_distribution_difference']:.2g}"
        + (f", p_female by {summary['max_p_female_difference']:.2g}" if "p_female" in summary["outputs"] else "")
        + f"; outputs: {', '.join(summary['outputs'])}"
    )
    return 0


def _calibrate(args) -> int:
    from c3ae_ray.calibrate import calibrate_file, format_summary

    print(format_summary(calibrate_file(args.model, args.data, args.out, args.coverage, args.val_fraction)))
    return 0


def _pipeline(args) -> int:
    from c3ae_ray.pipeline import format_summary, run_pipeline

    print(format_summary(run_pipeline(load_yaml(args.config))))
    return 0


def _serve(args) -> int:
    from c3ae_ray.serving import serve_forever

    served = serve_forever(args.stage.config(args))
    print(f"c3ae serve: stopped after {served['served_s']:.0f} s")
    return 0


# ---- the parser ----

DEVICES = ("auto", "cpu", "cuda")
RAY_WHERE = "Runs on a local Ray, or the cluster at RAY_ADDRESS."


def _add_preprocess(commands) -> None:
    from c3ae_ray.datasets import DATASETS
    from c3ae_ray.preprocess import PreprocessConfig

    (
        _Command(commands, "preprocess", PreprocessConfig, _preprocess, "dataset -> MTCNN -> face regions -> Parquet (Ray Data)",
                 "Detect faces in a face-age dataset and write one Parquet row per usable face, with a summary.json of "
                 f"counts. {RAY_WHERE}")
        .flag("--dataset", "dataset", choices=DATASETS)
        .flag("--root", "root", "the dataset's folder as published")
        .flag("--out", "out", "output folder: a local path or s3://bucket/prefix")
        .flag("--csv", "csv", "folder layout: labels CSV with columns path,age[,subject]; none means ROOT/labels.csv")
        .detection_flags()
        .progress_flag()
        .flag("--detectors", "detectors", "MTCNN actors; none means one per CPU, or per GPU", type=_positive_int)
        .flag("--batch-size", "batch_size", "images per detector batch", type=_positive_int)
        .flag("--limit", "limit", "only the first N images (sorted by path)", type=_positive_int)
        .flag("--min-age", "min_age", type=float)
        .flag("--max-age", "max_age", type=float)
        .flag("--mat-min-face-score", "mat_min_face_score", "IMDB-WIKI: minimum face_score from the .mat (negative: keep all)", type=_score_or_off)
        .flag("--keep-second-face", "drop_second_face", "IMDB-WIKI: keep images where the dataset saw a second face", action="store_const", const=False)
        .flag("--max-pixels", "max_pixels", "larger images are skipped", type=_positive_int)
        .flag("--align", "crop.align", "rotate each face region so the eyes are level (MTCNN landmarks); models "
              "trained on it align wherever they run", action="store_const", const=True)
        .flag("--overwrite", "overwrite", "replace an existing --out once the new one is complete", action="store_true")
    )


def _add_train(commands) -> None:
    from c3ae_ray.train import DATA_CACHES, TrainConfig

    (
        _Command(commands, "train", TrainConfig, _train, "preprocessed Parquet -> model.pt (Ray Train, data-parallel)",
                 "Train C3AE on `c3ae preprocess` output with Ray Train: data-parallel workers, batched augmentation, a "
                 f"checkpoint every epoch. Rerunning the same command on an unfinished --out resumes it. {RAY_WHERE} "
                 "--config takes TrainConfig fields (model: and augment: as mappings; augment: null turns it off).")
        .flag("--data", "data", "a `c3ae preprocess` output folder (path or s3://)")
        .flag("--val-data", "val_data", "a separate validation output; none means --val-fraction of --data")
        .flag("--val-fraction", "val_fraction", "share of --data held out by a hash of subject or file name", type=float)
        .flag("--out", "out", "run folder: path or s3:// (shared storage for a multi-node run)")
        .flag("--epochs", "epochs", type=_positive_int)
        .flag("--workers", "workers", "data-parallel workers", type=_positive_int)
        .flag("--gpu", "gpu", "one GPU per worker (DDP over NCCL)", action="store_true")
        .flag("--batch-size", "batch_size", "per worker", type=_positive_int)
        .flag("--lr", "lr", "Adam learning rate; none means 0.005 for the full model, 0.002 without SE", type=float)
        .flag("--init-from", "init_from", "fine-tune from this model.pt (its switches and bins are kept)")
        .flag("--gender-weight", "gender_weight", "weight of the gender head's cross-entropy in the loss", type=float)
        .flag("--no-context", "model.context", "one crop (the largest) instead of three", action="store_const", const=False)
        .flag("--no-cascade", "model.cascade", "no two-point bins: plain regression", action="store_const", const=False)
        .flag("--no-se", "model.se", "no squeeze-and-excitation (the plain C3AE)", action="store_const", const=False)
        .flag("--gender-head", "model.gender_head", "also predict gender (cross-entropy where the data has the label)",
              action="store_const", const=True)
        .flag("--ethnicity-head", "model.ethnicity_head", "train an ethnicity head as an auxiliary task (never an output)",
              action="store_const", const=True)
        .flag("--no-augment", "augment", "train without augmentation", action="store_const", const=None)
        .flag("--seed", "seed", type=int)
        .flag("--members", "members", "an ensemble: train this many models (seeds seed, seed+1, ...) one after another "
              "and write one model.pt that averages them", type=_positive_int)
        .flag("--data-cache", "data_cache", "memory: each worker decodes its faces once and keeps them; stream: decode "
              "every epoch; auto: memory up to 4 GiB per worker", choices=DATA_CACHES)
        .flag("--overwrite", "overwrite", "discard what --out holds and train from scratch", action="store_true")
    )


def _trial_flags(command: _Command) -> _Command:
    """Flags that evaluate and ablate share: where, how each trial trains, and where it runs."""
    return (
        command.flag("--data", "data", "a `c3ae preprocess` output folder (path or s3://)")
        .flag("--out", "out", "report folder: path or s3://; rerunning the same command resumes it")
        .flag("--epochs", "epochs", "epochs per trial", type=_positive_int)
        .flag("--batch-size", "batch_size", type=_positive_int)
        .flag("--lr", "lr", "Adam learning rate; none means 0.005 for the full model, 0.002 without SE", type=float)
        .flag("--seed", "seed", "seeds the splits and each trial's training", type=int)
        .flag("--trial-cpus", "trial_cpus", "CPUs per trial, may be fractional", type=float)
        .flag("--trial-gpus", "trial_gpus", "GPUs per trial, may be fractional", type=float)
        .flag("--max-failures", "max_failures", "retries of a failed trial before it is reported failed", type=int)
        .flag("--overwrite", "overwrite", "discard what --out holds and start over", action="store_true")
    )


def _add_evaluate(commands) -> None:
    from c3ae_ray.evaluate import EvalConfig

    command = (
        _Command(commands, "evaluate", EvalConfig, _evaluate, "FG-NET protocols on Ray Tune: repeated splits or leave-one-person-out",
                 "Train (or fine-tune) and test one model per split or fold, each a Ray Tune trial, and write summary.json, "
                 f"report.md and plots. {RAY_WHERE}")
        .flag("--protocol", "protocol", choices=("splits", "lopo"))
        .flag("--repeats", "repeats", "splits: number of random splits", type=_positive_int)
        .flag("--test-size", "test_size", "splits: test images per split", type=_positive_int)
        .flag("--by-subject", "by_subject", "splits: identity-disjoint test parts", action="store_true")
        .flag("--init-from", "init_from", "fine-tune every trial from this model.pt")
    )
    _trial_flags(command)


def _add_ablate(commands) -> None:
    from c3ae_ray.evaluate import EvalConfig
    from c3ae_ray.protocols import ABLATIONS

    command = (
        _Command(commands, "ablate", EvalConfig, _evaluate, "the paper's ablation on Ray Tune: full, no-context, no-cascade, no-augment, "
                 "no-SE, and the seeds' heads, Gaussian labels and aligned crops",
                 "Train every model variant with several seeds on one hash split (as training's) and compare them on its "
                 "test part, each a Ray Tune trial.")
        .flag("--seeds", "seeds", "trials per variant", type=_positive_int)
        .flag("--variants", "variants", nargs="+", choices=ABLATIONS)
        .flag("--aligned-data", "aligned_data", "`c3ae preprocess --align` output of the same images: the aligned variants "
              "train and test on it, every row on the images both outputs hold")
        .flag("--test-fraction", "test_fraction", "share held out by a hash of subject or path", type=float)
    )
    _trial_flags(command)


def _add_tune(commands) -> None:
    from c3ae_ray.tune import SCHEDULERS, SEARCHES, TuneConfig

    (
        _Command(commands, "tune", TuneConfig, _tune, "search the training recipe on Ray Tune (ASHA or HyperBand) -> best.yaml",
                 "Train one recipe per Ray Tune trial, drawn from --space, report each epoch's validation MAE and stop the "
                 "weaker trials early; write every trial's settings and result, plots, and the best recipe as a "
                 f"`c3ae train --config` YAML. Rerunning the same command resumes the search. {RAY_WHERE}")
        .flag("--data", "data", "a `c3ae preprocess` output folder (path or s3://)")
        .flag("--out", "out", "search folder: path or s3://; rerunning the same command resumes it")
        .flag("--space", "space", "YAML: training settings -> {loguniform|uniform|randint: [low, high]} or {choice: [...]}")
        .flag("--base", "base", "a `c3ae train --config` YAML for the settings the space does not search")
        .flag("--trials", "trials", type=_positive_int)
        .flag("--epochs", "epochs", "the most epochs a trial trains", type=_positive_int)
        .flag("--scheduler", "scheduler", "early stopping on the validation MAE", choices=SCHEDULERS)
        .flag("--search", "search", "how settings are drawn (optuna: the tune extra)", choices=SEARCHES)
        .flag("--grace-epochs", "grace_epochs", "asha: epochs before a trial may be stopped", type=_positive_int)
        .flag("--concurrent", "concurrent", "trials at once; none means as many as the cluster holds", type=_positive_int)
        .flag("--trial-cpus", "trial_cpus", "CPUs per trial, may be fractional", type=float)
        .flag("--trial-gpus", "trial_gpus", "GPUs per trial, may be fractional", type=float)
        .flag("--seed", "seed", "draws the settings and seeds every trial", type=int)
        .flag("--max-failures", "max_failures", "retries of a failed trial before it is reported failed", type=int)
        .flag("--overwrite", "overwrite", "discard what --out holds and start over", action="store_true")
    )


def _add_score(commands) -> None:
    from c3ae_ray.score import ScoreConfig

    (
        _Command(commands, "score", ScoreConfig, _score, "image store -> every face's age -> Parquet (Ray Data)",
                 "Detect every face in a folder, a file list, one image or an s3:// (gs://) prefix and write one Parquet row "
                 "per face with its age; videos give a row per face per frame sampled at --fps, with its time; images "
                 f"(or frames) without faces and unreadable files get a row each. {RAY_WHERE}")
        .flag("--input", "input", "folder, image, list of images (a line each) or s3://bucket/prefix")
        .flag("--out", "out", "output folder: a local path or s3://bucket/prefix")
        .flag("--model", "model", "a model.pt from `c3ae train` (path or s3://; the default is the bundled model)")
        .detection_flags()
        .progress_flag()
        .flag("--actors", "actors", "detector+model actors; none means one per CPU, or per GPU", type=_positive_int)
        .flag("--batch-size", "batch_size", "images per actor batch", type=_positive_int)
        .flag("--max-faces", "max_faces", "per image, most confident first; none means all", type=_positive_int)
        .flag("--max-pixels", "max_pixels", "larger images are error rows", type=_positive_int)
        .flag("--fps", "fps", "video frames sampled per second (a row per face per sampled frame)", type=float)
        .flag("--overwrite", "overwrite", "replace an existing --out once the new one is complete", action="store_true")
    )


def _add_predict(commands) -> None:
    from c3ae_ray.predict import PredictConfig

    command = (
        _Command(commands, "predict", PredictConfig, _predict,
                 "the age of every face in a few photos or videos, here and now (no Ray, bundled model by default)",
                 "Detect the faces in each image (and in a video's frames, sampled at --fps) and print each face's box and "
                 "age. Runs in this process; unreadable files and images without a face are reported per file. Exit 1 "
                 "only when no file could be read.")
        .flag("--model", "model", "a model.pt from `c3ae train` (path or s3://; the default is the bundled model)")
        .flag("--json", "json", "print the results as JSON", action="store_true")
        .flag("--draw", "draw", "write a copy of each photo with boxes and ages into this folder", metavar="OUT_DIR")
        .flag("--fps", "fps", "video frames sampled per second", type=float)
        .detection_flags()
    )
    command.parser.add_argument("images", nargs="+", metavar="FILE", help="images or videos (.mp4, .mov, .avi, .mkv, .webm)")


def _add_export(commands) -> None:
    from c3ae_ray.export import FORMATS

    parser = commands.add_parser(
        "export",
        help="a model file as ONNX or TorchScript (input: crops, output: age and distribution)",
        description="Export a model for runtimes without this package. Input `crops`: uint8 (N, 3, 3, 64, 64); "
        "outputs `age` (N,) and `distribution` (N, 12). The export is run against PyTorch before it is reported.",
    )
    parser.add_argument("--model", required=True, help="a model.pt (path or s3://)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="the file to write")
    parser.set_defaults(run=_export)


def _add_calibrate(commands) -> None:
    from c3ae_ray.calibrate import COVERAGE

    parser = commands.add_parser(
        "calibrate",
        help="give a model file its age range (a central interval calibrated on held-out faces)",
        description="Fit the age range of a model file on the validation faces of the preprocessed data it was trained "
        "on (one half of them), check its coverage on the other half, and write the file with it. `c3ae train` "
        "does this itself; this is for files trained before, or another coverage.",
    )
    parser.add_argument("--model", required=True, help="a model.pt (path or s3://)")
    parser.add_argument("--data", required=True, help="the `c3ae preprocess` output the model was trained on")
    parser.add_argument("--out", required=True, help="the calibrated model file to write (path or s3://)")
    parser.add_argument("--coverage", type=float, default=COVERAGE, help=f"share of true ages inside the range (default: {COVERAGE})")
    parser.add_argument("--val-fraction", type=float, help="the validation split (default: the one the model file records)")
    parser.set_defaults(run=_calibrate)


def _add_pipeline(commands) -> None:
    parser = commands.add_parser(
        "pipeline",
        help="preprocess -> pretrain -> fine-tune -> evaluate -> model file, resumable (YAML config)",
        description="Run the whole recipe from one YAML (see jobs/pipeline.yaml): IMDB-WIKI preprocessing, pretraining, "
        "fine-tuning on UTKFace or FG-NET, FG-NET evaluation and the final model file. Every step writes under the "
        f"config's out; rerunning the same config skips complete steps and resumes the rest. {RAY_WHERE}",
    )
    parser.add_argument("--config", required=True, help="pipeline YAML (path or s3://)")
    parser.set_defaults(run=_pipeline)


def _add_serve(commands) -> None:
    from c3ae_ray.api import API_KEY_ENV, LOG_LEVELS, MODEL_ENV, ServeConfig

    (
        _Command(commands, "serve", ServeConfig, _serve, "HTTP API and web page for the ages of the faces in a photo (Ray Serve)",
                 "Start the Serve app (POST /v1/age, GET /healthz, the web page at /, OpenAPI at /docs) on an embedded "
                 f"local Ray, or the cluster at RAY_ADDRESS, until Ctrl-C. With ${API_KEY_ENV} set, /v1/* needs that key "
                 "(Authorization: Bearer KEY or X-API-Key). --config takes the `args` of a Serve config file.")
        .flag("--model", "model", f"a model.pt from `c3ae train` (path or s3://); none means ${MODEL_ENV}, else the bundled model")
        .flag("--host", "host")
        .flag("--port", "port", type=_positive_int)
        .detection_flags()
        .flag("--max-batch-size", "max_batch_size", "requests per detector or model batch", type=_positive_int)
        .flag("--max-body-bytes", "limits.max_body_bytes", "larger bodies get 413", type=_positive_int)
        .flag("--max-pixels", "limits.max_pixels", "larger images get 413", type=_positive_int)
        .flag("--max-in-flight", "limits.max_in_flight", "more concurrent requests get 503", type=_positive_int)
        .flag("--timeout", "limits.timeout_s", "seconds before a request gets 504", type=float)
        .flag("--log-level", "log_level", "Ray Serve's own lines from this level (INFO: a line per request and call)",
              choices=LOG_LEVELS)
        .flag("--stats-interval", "stats_interval_s", "seconds between the lines of traffic (0: none)", type=float)
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="c3ae", description="C3AE age estimation on Ray (Zhang et al., CVPR 2019).")
    parser.add_argument("--version", action="version", version=f"c3ae {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("summary", help="print each model variant layer by layer with parameter counts (paper Table 1)").set_defaults(run=_summary)
    for add in (_add_preprocess, _add_train, _add_tune, _add_evaluate, _add_ablate, _add_score, _add_predict, _add_export, _add_calibrate, _add_pipeline, _add_serve):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """A UserError prints one line and exits 1; any other error is a bug: a line saying so, the traceback, exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as error:
        print(f"c3ae {args.command}: error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        print(f"c3ae {args.command}: internal error (a bug, not something you did): {type(error).__name__}: {error}\n"
              "The traceback follows; please report it.", file=sys.stderr)
        traceback.print_exc()
        return 2


if __name__ == "__main__":
    sys.exit(main())
