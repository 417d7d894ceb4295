"""Small helpers of the command-line tools: seeding, the run log, the project's version."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

import AnomalyCLIP_lib


def setup_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) and make cuDNN deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


class _LogFile(logging.FileHandler):
    """``log.txt``: a failed write (full disk) is raised, to end the run with one line, not printed as a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            raise OSError(error.errno, error.strerror, self.baseFilename) from error
        super().handleError(record)


def get_logger(save_path: str | os.PathLike, name: str = "anomalyclip", main_process: bool = True) -> logging.Logger:
    """A logger that prints messages and appends them to ``save_path/log.txt``, as the original does.

    Args:
        main_process: False on ranks other than 0 under torchrun: those only print warnings,
            and only rank 0 writes ``log.txt``.
    """
    save_path = Path(save_path)
    save_path.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        with contextlib.suppress(OSError):  # an earlier run's log on a full disk: that run reported it
            handler.close()
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    logger.propagate = False
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if main_process:
        # Opened at the first message: a run that fails before it leaves no empty log.txt (nor the folder it made).
        handlers.insert(0, _LogFile(save_path / "log.txt", mode="a", delay=True))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return logger


def project_version() -> dict[str, str | None]:
    """This project's version and, in a git checkout, its commit (with ``+dirty`` for local changes)."""
    import subprocess

    root = Path(__file__).resolve().parent
    commit = None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return {"anomalyclip": AnomalyCLIP_lib.__version__, "git_commit": commit}
