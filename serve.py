"""AnomalyCLIP as an HTTP service: ``POST /predict``, a web page at ``/``, Prometheus ``/metrics``.

    python serve.py --checkpoint_path CKPT [model flags] [--thresholds FILE] [--host H --port P]
    python serve.py --runtime onnxruntime --model EXPORT_DIR        # no torch imported

The command lives in :mod:`pipeline.service.server` (``python serve.py --help``; also ``python -m pipeline.service``).
"""

import os

# As test_one_example.py: idle OpenMP threads must sleep, not spin, on a CPU that other processes share
# (OpenMP reads this once, when torch loads; a value the user set is kept).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pipeline.cli import run_cli  # noqa: E402 - after the environment above
from pipeline.service.server import main  # noqa: E402 - after the environment above

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
