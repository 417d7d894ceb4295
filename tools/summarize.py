"""One summary table over several runs, for the end of train.sh and test.sh.

    python tools/summarize.py results RESULTS_DIR [RESULTS_DIR ...]   # reads */results.json
    python tools/summarize.py train CHECKPOINT_DIR [CHECKPOINT_DIR ...]  # reads */log.txt

``results``: per dataset and metric, ours beside the paper's value (``--paper released_log``: the
released logs') and the difference in points, the mean over the datasets run, and one line naming
the settings that differ from the released protocol (see :mod:`pipeline.reproduction`). Several
runs of one dataset (seeds) give their mean and standard deviation; ``--base DIR`` adds a run to
stand beside them (repeat it); ``--json FILE`` writes the table as summary.json, ``--report FILE``
as an HTML page with bars of ours against the paper's.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's modules
from pipeline import reproduction  # noqa: E402
from pipeline.atomic import atomic_write_text  # noqa: E402
from pipeline.cli import OneLineParser, run_cli  # noqa: E402

EPOCH_LINE = re.compile(r"epoch \[(\d+)/(\d+)\], loss:([-\d.naif]+), image_loss:([-\d.naif]+)")


def results_summary(folders: Sequence[Path], source: str, base: Sequence[Path] = (), json_path: Path | None = None,
                    report_path: Path | None = None) -> str:
    """The comparison with the published values as text; writes ``json_path`` and ``report_path`` when given."""
    comparison = reproduction.compare([reproduction.load_run(f) for f in folders], source,
                                      [reproduction.load_run(f) for f in base])
    if json_path is not None:
        atomic_write_text(json.dumps(comparison.as_json(), indent=2) + "\n", json_path)
    if report_path is not None:
        atomic_write_text(reproduction.render_html(comparison), report_path)
    return reproduction.render_text(comparison)


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


def _present(folders: Sequence[Path], wanted: str) -> list[Path]:
    """The folders holding ``wanted``; one stderr line for each other (a run that failed, or a mistyped folder)."""
    present = [f for f in folders if (f / wanted).is_file()]
    for skipped in (f for f in folders if f not in present):
        print(f"skipped {skipped}: {'no such folder' if not skipped.is_dir() else f'no {wanted} in it'}",
              file=sys.stderr)
    return present


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("results", "train"))
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--paper", choices=reproduction.SOURCES, default="paper",
                        help="results: compare with the paper's tables (default) or the released logs")
    parser.add_argument("--base", action="append", type=Path, default=[], metavar="DIR",
                        help="results: a run shown in its own column beside ours (e.g. the released checkpoints')")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="results: write the table as JSON")
    parser.add_argument("--report", type=Path, default=None, metavar="FILE.html",
                        help="results: write an HTML page with the table and bars of ours against the paper's")
    args = parser.parse_intermixed_args(argv)
    wanted = "results.json" if args.kind == "results" else "log.txt"
    folders = _present(args.folders, wanted)
    if not folders:
        print("no runs to summarise")
        return 0
    if args.kind == "results":
        print(results_summary(folders, args.paper, _present(args.base, wanted), args.json, args.report))
    else:
        print(tabulate(train_rows(folders), headers=["checkpoints", "epoch", "loss", "image_loss"], tablefmt="pipe"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
