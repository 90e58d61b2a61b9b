"""The `c3ae` command: parse arguments, call a stage function, print its summary. No logic lives here."""

from __future__ import annotations

import argparse
import sys

from c3ae_ray import __version__


def _summary(args: argparse.Namespace) -> int:
    from c3ae_ray.summary import summary_text

    print(summary_text())
    return 0


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
