"""The command line of every indexer script: ``--root DATASET_ROOT [--dry-run]`` plus the script's own flags.

Each ``generate_dataset_json/<name>.py`` script ends in :func:`run` with its layout. Flag mistakes
and user errors are one ``error: ...`` line with exit status 2 (:func:`pipeline.cli.run_cli`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from tabulate import tabulate

from generate_dataset_json.indexer import Layout, index_dataset
from generate_dataset_json.schema import SPLITS, MetaIndex
from pipeline.cli import cli_parser, run_cli

LayoutChoice = Layout | Callable[[argparse.Namespace], Layout]


def summary_table(index: MetaIndex) -> str:
    """A pipe table of normal / anomalous / masked image counts per split and class, with totals."""
    rows = []
    totals = [0, 0, 0]
    for split in SPLITS:
        for cls_name, items in index.get(split, {}).items():
            counts = [sum(1 for i in items if not i["anomaly"]), sum(1 for i in items if i["anomaly"]),
                      sum(1 for i in items if i["anomaly"] and i["mask_path"])]
            totals = [t + c for t, c in zip(totals, counts)]
            rows.append([split, cls_name, *counts])
    rows.append(["all", "", *totals])
    headers = ["split", "class", "normal", "anomalous", "with mask"]
    return tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=[1])


def masks_note(index: MetaIndex) -> str | None:
    """A note on the anomalous test images without a mask (image-level metrics only), or ``None``."""
    unmasked = sum(1 for items in index["test"].values() for i in items if i["anomaly"] and not i["mask_path"])
    if not unmasked:
        return None
    return f"{unmasked} anomalous test image(s) have no mask: they count for image-level metrics only"


def build_parser(layout: LayoutChoice, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 description: str | None = None) -> argparse.ArgumentParser:
    """The indexer's flags: ``--root``, ``--dry-run`` and the script's own (``add_arguments``)."""
    fixed = hasattr(layout, "collect")
    parser = cli_parser(description or f"Index {layout.name if fixed else 'a dataset'} into DATASET_ROOT/meta.json.")
    if fixed:
        parser.epilog = f"Expected layout: {layout.hint}"
    # SUPPRESS: a required option has no default worth showing in --help
    parser.add_argument("--root", required=True, default=argparse.SUPPRESS,
                        help="the dataset root; meta.json is written there")
    parser.add_argument("--dry-run", action="store_true", help="index and print the counts, write nothing")
    if add_arguments is not None:
        add_arguments(parser)
    return parser


def main(layout: LayoutChoice, argv: Sequence[str] | None = None,
         add_arguments: Callable[[argparse.ArgumentParser], None] | None = None, description: str | None = None) -> int:
    """Index ``--root`` with ``layout`` (or the layout built from the parsed flags) and print the counts.

    Raises:
        AnomalyCLIPError: Any problem of the dataset (all listed in one line).
    """
    args = build_parser(layout, add_arguments, description).parse_args(None if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    chosen = layout if hasattr(layout, "collect") else layout(args)
    index = index_dataset(chosen, args.root, write=not args.dry_run)
    print(f"{chosen.name}: {'would write' if args.dry_run else 'wrote'} {Path(args.root) / 'meta.json'}")
    print(summary_table(index))
    note = masks_note(index)
    if note:
        print(f"note: {note}")
    return 0


def run(layout: LayoutChoice, argv: Sequence[str] | None = None,
        add_arguments: Callable[[argparse.ArgumentParser], None] | None = None, description: str | None = None) -> int:
    """:func:`main` through :func:`pipeline.cli.run_cli`: the exit status, a user error as one ``error:`` line (2).

    Args:
        layout: The layout, or a function building it from the parsed flags.
        argv: The flags (default ``sys.argv[1:]``).
        add_arguments: Adds the script's own flags to the parser.
        description: ``--help`` text (default: the layout's name).
    """
    return run_cli(lambda flags: main(layout, flags, add_arguments, description), argv)
