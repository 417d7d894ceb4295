"""The console commands ``pip install .`` (or ``pip install -e .``) puts on the PATH (pyproject.toml's
``[project.scripts]``): the same commands as the scripts of the repository.

* ``anomalyclip-serve``: ``python serve.py`` (:mod:`pipeline.service.server`);
* ``anomalyclip-predict``: ``python test_one_example.py`` (:mod:`pipeline.prediction`).

As the scripts do, each sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the user set it) before anything imports
torch: OpenMP reads it once, when torch loads (see test_one_example.py).
"""

from __future__ import annotations

import os


def _passive_openmp() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def serve() -> int:
    """``anomalyclip-serve``: the inspection service (``serve.py``)."""
    _passive_openmp()
    from pipeline.cli import run_cli
    from pipeline.service.server import main

    return run_cli(main)


def predict() -> int:
    """``anomalyclip-predict``: scores, verdicts, masks and overlays of images (``test_one_example.py``)."""
    _passive_openmp()
    from pipeline.cli import run_cli
    from pipeline.prediction import main

    return run_cli(main)
