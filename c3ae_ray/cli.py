"""The `c3ae` command: parse arguments, call a stage function, print its summary. No logic lives here."""

from __future__ import annotations

import argparse
import sys

from c3ae_ray import __version__


def _summary(args: argparse.Namespace) -> int:
    from c3ae_ray.summary import summary_text

    print(summary_text())
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from c3ae_ray.preprocess import PreprocessConfig, format_summary, preprocess

    cfg = PreprocessConfig(
        dataset=args.dataset,
        root=args.root,
        out=args.out,
        csv=args.csv,
        device=args.device,
        detectors=args.detectors,
        batch_size=args.batch_size,
        limit=args.limit,
        min_face_score=args.min_face_score,
        min_age=args.min_age,
        max_age=args.max_age,
        mat_min_face_score=None if args.mat_min_face_score < 0 else args.mat_min_face_score,
        drop_second_face=not args.keep_second_face,
        max_pixels=args.max_pixels,
        overwrite=args.overwrite,
    )
    print(format_summary(preprocess(cfg)))
    return 0


def _train(args: argparse.Namespace) -> int:
    from c3ae_ray.train import format_summary, train, train_config

    flags = {
        "data": args.data, "out": args.out, "val_data": args.val_data, "val_fraction": args.val_fraction,
        "epochs": args.epochs, "workers": args.workers, "gpu": args.gpu or None, "batch_size": args.batch_size,
        "lr": args.lr, "init_from": args.init_from, "seed": args.seed, "overwrite": args.overwrite or None,
        "context": False if args.no_context else None, "cascade": False if args.no_cascade else None,
        "se": False if args.no_se else None, "augment": False if args.no_augment else None,
    }
    print(format_summary(train(train_config(args.config, flags))))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from c3ae_ray.evaluate import EvalConfig, evaluate, format_report

    protocol = getattr(args, "protocol", None) or "ablation"
    given = {k: v for k, v in vars(args).items() if k in EvalConfig.__dataclass_fields__ and v is not None}
    summary = evaluate(EvalConfig(**{**given, "protocol": protocol, "variants": tuple(args.variants or EvalConfig.variants)}))
    print(format_report(summary))
    print(f"report: {summary['out']}/report.md, summary.json, trial_mae.png, pred_vs_true.png, error_by_decade.png")
    if summary["failed"]:
        print(f"c3ae {args.command}: {summary['failed']} of {summary['trials']} trials failed (listed in the report)", file=sys.stderr)
        return 1
    return 0


def _score(args: argparse.Namespace) -> int:
    from c3ae_ray.score import ScoreConfig, format_summary, score

    cfg = ScoreConfig(
        input=args.input, out=args.out, model=args.model, device=args.device, actors=args.actors,
        batch_size=args.batch_size, min_face_score=args.min_face_score, max_faces=args.max_faces,
        max_pixels=args.max_pixels, overwrite=args.overwrite,
    )
    print(format_summary(score(cfg)))
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from c3ae_ray.pipeline import format_summary, load_config, run_pipeline

    print(format_summary(run_pipeline(load_config(args.config))))
    return 0


def _predict(args: argparse.Namespace) -> int:
    import json

    from c3ae_ray.predict import format_results, predict_files

    results = predict_files(args.images, args.model, args.device, args.min_face_score, args.draw)
    print(json.dumps(results, indent=2) if args.json else format_results(results))
    if all(result["error"] for result in results):
        print(f"c3ae predict: none of the {len(results)} file(s) could be read", file=sys.stderr)
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    from c3ae_ray.export import export_model

    summary = export_model(args.model, args.format, args.out)
    print(
        f"{summary['out']}: {summary['format']}, {summary['bytes']:,} bytes; against PyTorch the ages differ by at most "
        f"{summary['max_age_difference']:.2g} years, the distributions by {summary['max_distribution_difference']:.2g}"
    )
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_preprocess(commands) -> None:
    from c3ae_ray.datasets import DATASETS
    from c3ae_ray.images import DEFAULT_MAX_PIXELS

    parser = commands.add_parser(
        "preprocess",
        help="dataset -> MTCNN -> face regions -> Parquet (Ray Data)",
        description="Detect faces in a face-age dataset and write one Parquet row per usable face, with a "
        "summary.json of counts. Runs on a local Ray, or the cluster at RAY_ADDRESS.",
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", required=True, help="the dataset's folder as published")
    parser.add_argument("--out", required=True, help="output folder: a local path or s3://bucket/prefix")
    parser.add_argument("--csv", help="folder layout: labels CSV with columns path,age[,subject] (default ROOT/labels.csv)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--detectors", type=_positive_int, help="MTCNN actors (default: one per CPU, or per GPU)")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="images per detector batch")
    parser.add_argument("--limit", type=_positive_int, help="only the first N images (sorted by path)")
    parser.add_argument("--min-face-score", type=float, default=0.9, help="MTCNN probability for a face to count")
    parser.add_argument("--min-age", type=float, default=0.0)
    parser.add_argument("--max-age", type=float, default=120.0)
    parser.add_argument(
        "--mat-min-face-score", type=float, default=1.0,
        help="IMDB-WIKI: minimum face_score from the .mat (negative: keep all)",
    )
    parser.add_argument("--keep-second-face", action="store_true", help="IMDB-WIKI: keep images with a second face")
    parser.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS, help="larger images are skipped")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")
    parser.set_defaults(run=_preprocess)


def _add_train(commands) -> None:
    parser = commands.add_parser(
        "train",
        help="preprocessed Parquet -> model.pt (Ray Train, data-parallel)",
        description="Train C3AE on `c3ae preprocess` output with Ray Train: data-parallel workers, batched "
        "augmentation, a checkpoint every epoch. Rerunning the same command on an unfinished --out resumes it. "
        "Runs on a local Ray, or the cluster at RAY_ADDRESS. Flags override --config.",
    )
    parser.add_argument("--data", help="a `c3ae preprocess` output folder (path or s3://)")
    parser.add_argument("--val-data", help="a separate validation output (default: --val-fraction of --data)")
    parser.add_argument("--val-fraction", type=float, help="share of --data held out by a hash of subject or path (0.1)")
    parser.add_argument("--out", help="run folder: path or s3:// (shared storage for a multi-node run)")
    parser.add_argument("--config", help="YAML with TrainConfig fields (model: and augment: as mappings)")
    parser.add_argument("--epochs", type=_positive_int)
    parser.add_argument("--workers", type=_positive_int, help="data-parallel workers (1)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (DDP over NCCL)")
    parser.add_argument("--batch-size", type=_positive_int, help="per worker (50)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (0.005 full model, 0.002 without SE)")
    parser.add_argument("--init-from", help="fine-tune from this model.pt (its switches and bins are kept)")
    parser.add_argument("--no-context", action="store_true", help="one crop (the largest) instead of three")
    parser.add_argument("--no-cascade", action="store_true", help="no two-point bins: plain regression")
    parser.add_argument("--no-se", action="store_true", help="no squeeze-and-excitation (the plain C3AE)")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--overwrite", action="store_true", help="discard what --out holds and train from scratch")
    parser.set_defaults(run=_train)


def _add_trial_flags(parser) -> None:
    """Flags that evaluate and ablate share: how each trial trains and where it runs."""
    parser.add_argument("--data", required=True, help="a `c3ae preprocess` output folder (path or s3://)")
    parser.add_argument("--out", required=True, help="report folder: path or s3://; rerunning the same command resumes it")
    parser.add_argument("--epochs", type=_positive_int, help="epochs per trial (30)")
    parser.add_argument("--batch-size", type=_positive_int, help="(50)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (0.005 full model, 0.002 without SE)")
    parser.add_argument("--seed", type=int, help="seeds the splits and each trial's training (0)")
    parser.add_argument("--trial-cpus", type=float, help="CPUs per trial, may be fractional (1)")
    parser.add_argument("--trial-gpus", type=float, help="GPUs per trial, may be fractional (0)")
    parser.add_argument("--max-failures", type=int, help="retries of a failed trial before it is reported failed (2)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="discard what --out holds and start over")


def _add_evaluate(commands) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="FG-NET protocols on Ray Tune: repeated splits or leave-one-person-out",
        description="Train (or fine-tune) and test one model per split or fold, each a Ray Tune trial, and "
        "write summary.json, report.md and plots. Runs on a local Ray, or the cluster at RAY_ADDRESS.",
    )
    parser.add_argument("--protocol", required=True, choices=("splits", "lopo"))
    parser.add_argument("--repeats", type=_positive_int, help="splits: number of random splits (10)")
    parser.add_argument("--test-size", type=_positive_int, help="splits: test images per split (30)")
    parser.add_argument("--by-subject", action="store_true", default=None, help="splits: identity-disjoint test parts")
    parser.add_argument("--init-from", help="fine-tune every trial from this model.pt")
    _add_trial_flags(parser)
    parser.set_defaults(run=_evaluate, variants=None)


def _add_ablate(commands) -> None:
    from c3ae_ray.evaluate import ABLATIONS

    parser = commands.add_parser(
        "ablate",
        help="the paper's ablation on Ray Tune: full, no-context, no-cascade, no-augment, no-SE",
        description="Train every model variant with several seeds on one hash split (as training's) and "
        "compare them on its test part, each a Ray Tune trial.",
    )
    parser.add_argument("--seeds", type=_positive_int, help="trials per variant (3)")
    parser.add_argument("--variants", nargs="+", choices=ABLATIONS, help="(all)")
    parser.add_argument("--test-fraction", type=float, help="share held out by a hash of subject or path (0.1)")
    _add_trial_flags(parser)
    parser.set_defaults(run=_evaluate)


def _add_score(commands) -> None:
    from c3ae_ray.images import DEFAULT_MAX_PIXELS
    from c3ae_ray.model import BUNDLED_MODEL

    parser = commands.add_parser(
        "score",
        help="image store -> every face's age -> Parquet (Ray Data)",
        description="Detect every face in a folder, a file list, one image or an s3:// (gs://) prefix and write one "
        "Parquet row per face with its age; images without faces and unreadable files get a row each. Runs "
        "on a local Ray, or the cluster at RAY_ADDRESS.",
    )
    parser.add_argument("--input", required=True, help="folder, image, list of images (a line each) or s3://bucket/prefix")
    parser.add_argument("--out", required=True, help="output folder: a local path or s3://bucket/prefix")
    parser.add_argument("--model", default=str(BUNDLED_MODEL), help="a model.pt from `c3ae train` (path or s3://; default: the bundled model)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--actors", type=_positive_int, help="detector+model actors (default: one per CPU, or per GPU)")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="images per actor batch")
    parser.add_argument("--min-face-score", type=float, default=0.9, help="MTCNN probability for a face to count")
    parser.add_argument("--max-faces", type=_positive_int, help="per image, most confident first (default: all)")
    parser.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS, help="larger images are error rows")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")
    parser.set_defaults(run=_score)


def _add_predict(commands) -> None:
    from c3ae_ray.model import BUNDLED_MODEL

    parser = commands.add_parser(
        "predict",
        help="the age of every face in a few photos, here and now (no Ray, bundled model by default)",
        description="Detect the faces in each image and print each face's box and age. Runs in this process; "
        "unreadable files and images without a face are reported per file. Exit 1 only when no file could be read.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--model", default=str(BUNDLED_MODEL), help="a model.pt from `c3ae train` (path or s3://; default: the bundled model)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--draw", metavar="OUT_DIR", help="write a copy of each photo with boxes and ages here")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--min-face-score", type=float, default=0.9, help="MTCNN probability for a face to count")
    parser.set_defaults(run=_predict)


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


def _add_pipeline(commands) -> None:
    parser = commands.add_parser(
        "pipeline",
        help="preprocess -> pretrain -> fine-tune -> evaluate -> model file, resumable (YAML config)",
        description="Run the whole recipe from one YAML (see jobs/pipeline.yaml): IMDB-WIKI preprocessing, "
        "pretraining, fine-tuning on UTKFace or FG-NET, FG-NET evaluation and the final model file. Every step "
        "writes under the config's out; rerunning the same config skips complete steps and resumes the rest. "
        "Runs on a local Ray, or the cluster at RAY_ADDRESS.",
    )
    parser.add_argument("--config", required=True, help="pipeline YAML (path or s3://)")
    parser.set_defaults(run=_pipeline)


def _serve(args: argparse.Namespace) -> int:
    from c3ae_ray.serving import Limits, ServeConfig, default_model, serve_forever

    limits = Limits(max_body_bytes=args.max_body_bytes, max_pixels=args.max_pixels, max_in_flight=args.max_in_flight, timeout_s=args.timeout)
    cfg = ServeConfig(
        model=args.model or default_model(), device=args.device, host=args.host, port=args.port, min_face_score=args.min_face_score,
        max_batch_size=args.max_batch_size, limits=limits,
    )
    served = serve_forever(cfg)
    print(f"c3ae serve: stopped after {served['served_s']:.0f} s")
    return 0


def _add_serve(commands) -> None:
    from c3ae_ray.serving import API_KEY_ENV, MODEL_ENV, Limits, ServeConfig

    parser = commands.add_parser(
        "serve",
        help="HTTP API and web page for the ages of the faces in a photo (Ray Serve)",
        description="Start the Serve app (POST /v1/age, GET /healthz, the web page at /, OpenAPI at /docs) on an "
        f"embedded local Ray, or the cluster at RAY_ADDRESS, until Ctrl-C. With ${API_KEY_ENV} set, /v1/* needs "
        "that key (Authorization: Bearer KEY or X-API-Key).",
    )
    parser.add_argument("--model", help=f"a model.pt from `c3ae train` (path or s3://; default ${MODEL_ENV}, else the bundled model)")
    parser.add_argument("--host", default=ServeConfig.host)
    parser.add_argument("--port", type=_positive_int, default=ServeConfig.port)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--min-face-score", type=float, default=ServeConfig.min_face_score, help="MTCNN probability for a face to count")
    parser.add_argument("--max-batch-size", type=_positive_int, default=ServeConfig.max_batch_size, help="requests per detector or model batch")
    parser.add_argument("--max-body-bytes", type=_positive_int, default=Limits.max_body_bytes, help="larger bodies get 413")
    parser.add_argument("--max-pixels", type=_positive_int, default=Limits.max_pixels, help="larger images get 413")
    parser.add_argument("--max-in-flight", type=_positive_int, default=Limits.max_in_flight, help="more concurrent requests get 503")
    parser.add_argument("--timeout", type=float, default=Limits.timeout_s, help="seconds before a request gets 504")
    parser.set_defaults(run=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="c3ae",
        description="C3AE age estimation on Ray (Zhang et al., CVPR 2019).",
    )
    parser.add_argument("--version", action="version", version=f"c3ae {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    summary = commands.add_parser(
        "summary", help="print each model variant layer by layer with parameter counts (paper Table 1)"
    )
    summary.set_defaults(run=_summary)
    _add_preprocess(commands)
    _add_train(commands)
    _add_evaluate(commands)
    _add_ablate(commands)
    _add_score(commands)
    _add_predict(commands)
    _add_export(commands)
    _add_pipeline(commands)
    _add_serve(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Errors a user can fix (bad input, existing output, nothing usable) print one line and exit 1."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"c3ae {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
