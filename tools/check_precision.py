"""What a lower precision changes on YOUR model and data, before you switch to it.

Runs ``test.py`` on a labelled dataset (a ``meta.json`` root) with an export once per precision --
fp32 first, the reference -- and prints, per precision, the seconds per image, the mean metrics
and their change from fp32, and the largest change of an image score::

    python export.py --checkpoint_path CKPT --format onnx --out export_fp32
    python export.py --checkpoint_path CKPT --format onnx --quantize int8 --out export_int8   # optional
    python tools/check_precision.py --model export_fp32 --int8_model export_int8 --data_path ./data/visa \\
        --save_path ./check_precision

Precisions (``--precisions``; default: fp32, then bf16 and fp16 where OpenVINO offers them on
this CPU, then int8 when ``--int8_model`` is given): fp16/bf16 run on ``--runtime openvino`` with
its inference precision hint, int8 on ``--int8_runtime`` (ONNX Runtime by default) with the
quantised export. Each run's ``results.json``, ``scores.csv`` and ``thresholds.json`` are kept
under ``SAVE_PATH/<precision>/``; the comparison goes to ``SAVE_PATH/check_precision.json``.
Thresholds chosen at one precision hold only for it: re-calibrate after switching.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's modules
from AnomalyCLIP_lib.errors import AnomalyCLIPError  # noqa: E402
from AnomalyCLIP_lib.precision import RUN_PRECISIONS  # noqa: E402
from pipeline.atomic import atomic_write_text  # noqa: E402
from pipeline.cli import check_output_folder, cli_parser, run_cli  # noqa: E402

METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")
RESULT_NAME = "check_precision.json"


def build_parser():
    parser = cli_parser("Metric change of each precision against fp32 on a labelled dataset (an export's).")
    parser.add_argument("--model", required=True, help="fp32 export folder (export.py --format onnx|openvino)")
    parser.add_argument("--int8_model", default=None, help="the same model exported with --quantize int8")
    parser.add_argument("--data_path", required=True, help="labelled dataset root holding meta.json")
    parser.add_argument("--save_path", default="./check_precision", help="folder for each precision's run")
    parser.add_argument("--runtime", choices=("openvino", "onnxruntime"), default="openvino",
                        help="runtime of fp32, fp16 and bf16 (fp16/bf16 need openvino)")
    parser.add_argument("--int8_runtime", choices=("onnxruntime", "openvino"), default="onnxruntime",
                        help="runtime of the int8 export")
    parser.add_argument("--precisions", nargs="+", choices=RUN_PRECISIONS, default=None,
                        help="precisions to compare with fp32 (default: what this CPU offers, see above)")
    parser.add_argument("--classes", nargs="+", default=None, help="evaluate a subset of classes")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the runtime")
    return parser


def default_precisions(runtime: str, int8_model: str | None) -> list[str]:
    """fp32, the half precisions OpenVINO offers on this CPU (with ``--runtime openvino``), int8 with an int8 export."""
    precisions = ["fp32"]
    if runtime == "openvino":
        from deploy.runtime import openvino_capabilities

        offered = openvino_capabilities()
        precisions += [name for name, capability in (("bf16", "BF16"), ("fp16", "FP16")) if capability in offered]
    return precisions + (["int8"] if int8_model else [])


def checked_precisions(args: Any) -> list[str]:
    """The precisions to run, fp32 first; one-line errors for what cannot run."""
    precisions = args.precisions or default_precisions(args.runtime, args.int8_model)
    precisions = ["fp32", *dict.fromkeys(p for p in precisions if p != "fp32")]
    if "int8" in precisions and not args.int8_model:
        raise AnomalyCLIPError("--precisions int8 needs --int8_model DIR: the model exported with export.py --format "
                               "onnx --quantize int8")
    if args.runtime == "onnxruntime" and {"fp16", "bf16"} & set(precisions):
        raise AnomalyCLIPError("--precisions fp16/bf16 run on OpenVINO: use --runtime openvino")
    check_output_folder(args.save_path, "--save_path")
    return precisions


def run_argv(args: Any, precision: str) -> list[str]:
    """``test.py``'s flags for one precision's run."""
    int8 = precision == "int8"
    argv = ["--runtime", args.int8_runtime if int8 else args.runtime,
            "--model", args.int8_model if int8 else args.model, "--data_path", args.data_path,
            "--save_path", str(Path(args.save_path) / precision), "--batch_size", str(args.batch_size)]
    if not int8:
        argv += ["--precision", precision]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.classes:
        argv += ["--classes", *args.classes]
    return argv


def read_scores(folder: Path) -> dict[str, float]:
    """``{image path: score}`` of a run's ``scores.csv``."""
    with open(folder / "scores.csv", newline="", encoding="utf-8") as handle:
        return {row["img_path"]: float(row["score"]) for row in csv.DictReader(handle)}


def comparison_row(precision: str, summary: dict[str, Any], reference: dict[str, Any],
                   scores: dict[str, float], reference_scores: dict[str, float]) -> dict[str, Any]:
    """One precision's line: speed, mean metrics, their change from fp32, the largest score change."""
    row: dict[str, Any] = {"precision": precision, "runtime": summary.get("runtime"),
                           "s_per_image": summary["wall_time_s"] / max(1, summary["n_images"])}
    for name in METRICS:
        value, base = summary["mean"].get(name), reference["mean"].get(name)
        row[name] = value
        row[f"delta_{name}"] = None if value is None or base is None else value - base
    row["max_score_change"] = max(abs(score - reference_scores[path]) for path, score in scores.items())
    return row


def _cell(value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["precision", "runtime", "s/image", *(f"{m} (Δ)" for m in METRICS), "max |Δscore|"]
    lines = [[row["precision"], row["runtime"], f"{row['s_per_image']:.3f}",
              *(f"{_cell(row[m])} ({_cell(row[f'delta_{m}'], signed=True)})" for m in METRICS),
              f"{row['max_score_change']:.2g}"] for row in rows]
    return tabulate(lines, headers=headers, tablefmt="pipe")


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline import evaluation  # torch: the evaluation's DataLoader

    args = build_parser().parse_args(argv)
    precisions = checked_precisions(args)
    summaries = {precision: evaluation.evaluate(evaluation.parse_args(run_argv(args, precision)))
                 for precision in precisions}
    folders = {precision: Path(args.save_path) / precision for precision in precisions}
    reference_scores = read_scores(folders["fp32"])
    rows = [comparison_row(p, summaries[p], summaries["fp32"], read_scores(folders[p]), reference_scores)
            for p in precisions]
    text = table(rows)
    print(f"metrics in %, change from fp32 in brackets; {args.data_path}, {summaries['fp32']['n_images']} images")
    print(text)
    atomic_write_text(json.dumps({"data_path": str(args.data_path), "model": str(args.model),
                                  "int8_model": args.int8_model, "rows": rows}, indent=2) + "\n",
                      Path(args.save_path) / RESULT_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
