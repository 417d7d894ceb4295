"""``python -m pipeline.service ...``: the same as ``python serve.py ...``."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pipeline.cli import run_cli  # noqa: E402 - after the environment above
from pipeline.service.server import main  # noqa: E402 - after the environment above

raise SystemExit(run_cli(main))
