"""Index your own images: ``python generate_dataset_json/folder.py --root DATASET_ROOT``.

Layout (MVTec AD style), for each class folder of the root::

    <class>/test/<type>/*                  required; normal type(s) --normal-names (default good)
    <class>/train/good/*                   optional
    <class>/ground_truth/<type>/<stem><suffix>.<ext>   optional masks (--mask-suffix, default _mask)

Classes are the root's folders that hold a ``test`` folder, sorted by name (or ``--classes`` in
the order given); a root that itself holds ``test`` is one class named after the root.
Anomalous type folders without a ``ground_truth/<type>`` folder are indexed without masks
(image-level metrics only; the run says so). When the mask folder exists, every image of the
type needs its mask and every mask its image. Masks may have any image extension;
``--mask-suffix ""`` pairs ``000.png`` with ``ground_truth/<type>/000.png``. Each normal name
must be a type folder of some class (a misspelt one would index every image as anomalous); a
dataset without normal images takes ``--normal-names`` with no name.
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate_dataset_json.indexer import FolderLayout, MaskRule  # noqa: E402


def folder_layout(normal_names: tuple[str, ...] = ("good",), mask_suffix: str = "_mask",
                  classes: tuple[str, ...] | None = None) -> FolderLayout:
    """The layout of a user's MVTec-style folder.

    Args:
        normal_names: Type folders holding normal images.
        mask_suffix: Appended to an image's stem to name its mask.
        classes: Only these classes, in this order; ``None`` takes every class folder, sorted.

    Returns:
        A layout for :func:`generate_dataset_json.indexer.index_dataset`.
    """
    return FolderLayout(
        name="custom dataset",
        hint=f"ROOT/<class>/test/<type>/* with normal type(s) {', '.join(normal_names) or '(none)'}, optional "
        f"ROOT/<class>/train/<normal type>/* and masks ROOT/<class>/ground_truth/<type>/<stem>{mask_suffix}.<ext>",
        normal_types=tuple(normal_names),
        masks="optional",
        mask_rule=MaskRule(mask_suffix, None),
        class_filter=classes,
        check_normal_types=True,
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--normal-names", nargs="*", default=["good"], metavar="NAME",
                        help="type folder name(s) that hold normal images, each found in some class; no name: the "
                             "dataset has no normal images")
    parser.add_argument("--mask-suffix", default="_mask",
                        help="mask file name = image stem + this suffix + any image extension")
    # the formatter adds "(default: ...)" unless the help names %(default)s itself
    parser.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                        help="index only these class folders, in this order (default: all, sorted)%(default).0s")


def _layout(args: argparse.Namespace) -> FolderLayout:
    return folder_layout(tuple(args.normal_names), args.mask_suffix, tuple(args.classes) if args.classes else None)


if __name__ == "__main__":
    from generate_dataset_json.command import run

    sys.exit(run(_layout, add_arguments=_add_arguments,
                 description="Index your own MVTec-style image folders into DATASET_ROOT/meta.json. Layout: "
                 "ROOT/<class>/test/<type>/*, optional ROOT/<class>/train/<normal type>/* and optional masks "
                 "ROOT/<class>/ground_truth/<type>/<stem><suffix>.<ext>."))
