"""One summary table over several runs, for the end of train.sh and test.sh.

    python tools/summarize.py results RESULTS_DIR [RESULTS_DIR ...]   # reads */results.json
    python tools/summarize.py train CHECKPOINT_DIR [CHECKPOINT_DIR ...]  # reads */log.txt
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's modules
from AnomalyCLIP_lib.errors import AnomalyCLIPError  # noqa: E402
from pipeline.cli import OneLineParser, run_cli  # noqa: E402

METRICS = ("pixel_auroc", "pixel_aupro", "image_auroc", "image_ap")
EPOCH_LINE = re.compile(r"epoch \[(\d+)/(\d+)\], loss:([-\d.naif]+), image_loss:([-\d.naif]+)")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}"


def results_rows(folders: Sequence[Path]) -> list[list[str]]:
    rows = []
    for folder in folders:
        path = folder / "results.json"
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
            mean = summary["mean"]
            rows.append([summary["dataset"], summary["metric_set"], *(_percent(mean.get(m)) for m in METRICS)])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise AnomalyCLIPError(f"{path} is not a results.json written by test.py ({type(error).__name__}: "
                                   f"{error}); run test.py again or leave that folder out") from None
    return rows


def train_rows(folders: Sequence[Path]) -> list[list[str]]:
    rows = []
    for folder in folders:
        matches = EPOCH_LINE.findall((folder / "log.txt").read_text(encoding="utf-8"))
        if not matches:
            rows.append([str(folder), "-", "-", "-"])
            continue
        epoch, total, loss, image_loss = matches[-1]
        rows.append([str(folder), f"{epoch}/{total}", loss, image_loss])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("results", "train"))
    parser.add_argument("folders", nargs="*", type=Path)
    args = parser.parse_args(argv)
    wanted = "results.json" if args.kind == "results" else "log.txt"
    folders = [f for f in args.folders if (f / wanted).is_file()]
    for skipped in (f for f in args.folders if f not in folders):  # a run that failed, or a mistyped folder
        print(f"skipped {skipped}: {'no such folder' if not skipped.is_dir() else f'no {wanted} in it'}",
              file=sys.stderr)
    if not folders:
        print("no runs to summarise")
        return 0
    if args.kind == "results":
        print(tabulate(results_rows(folders), headers=["dataset", "metrics", *METRICS], tablefmt="pipe"))
    else:
        print(tabulate(train_rows(folders), headers=["checkpoints", "epoch", "loss", "image_loss"], tablefmt="pipe"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
