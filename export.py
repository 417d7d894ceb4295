"""Export the scoring path to one graph (ONNX or OpenVINO IR) plus its manifest, for deployment.

The command lives in :mod:`deploy.export`; this script is its entry point (``python export.py --help``).
"""

from deploy.export import main
from pipeline.cli import run_cli

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
