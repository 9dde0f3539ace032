"""The `reidgen` command line: one module per command group, each adding its commands with
`register(sub)`. Heavy imports happen inside each command, so `--help` is instant."""
from __future__ import annotations

import argparse
import sys

from reidgen.cli import checkpoints, demo, evaluation, grids, masks, serving, train
from reidgen.core.errors import ReidgenError

DESCRIPTION = """\
reidgen: synthetic training data for person re-identification (DG-Net, CR-GAN).

Data sets are Market-1501 style folders (bounding_box_train/, query/, bounding_box_test/);
--data takes a path or a data set name under $REIDGEN_DATA (default ../shared/data).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reidgen", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # in the order --help lists them
    for group in (train, evaluation, grids, masks, serving, checkpoints, demo):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ReidgenError as exc:
        print(f"reidgen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reidgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
