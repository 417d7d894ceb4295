"""``torchrun`` that ends a user error, Ctrl-C or SIGTERM as one line.

Usage: ``python launch.py [torchrun flags] SCRIPT [SCRIPT flags]``, e.g.
``python launch.py --nproc_per_node 2 test.py --data_path ./data/visa ...``. Every flag of
``torchrun`` works (this runs torch's own launcher).

* A user error: the rank that found it prints its ``error: ...`` line and exits with status 2, the
  others stop with it; torchrun would follow that line with a traceback of its own and a failure
  summary: this launcher adds nothing and exits with status 2.
* Ctrl-C or SIGTERM: every rank is stopped (torchrun passes the signal on; our CLIs clean up as on
  a single process) and this launcher prints ``interrupted`` (status 130) or ``terminated`` (143),
  the ranks print nothing of their own (they see :data:`LAUNCHED_ENV`).
* ``test_one_example.py``, ``export.py`` and ``synthetic_dataset.py`` run in one process: refused up
  front (every rank would write the same files).
* Any other failure (a crash) gets torchrun's summary and status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

USER_ERROR = 2  # the exit status of our CLIs on a user error (cli.run_cli)
# A rank torchrun stopped because another one had exited: killed by SIGTERM, or our CLIs' exit on it (128 + 15).
STOPPED = (-int(signal.SIGTERM), 128 + int(signal.SIGTERM))
# Set for the ranks: the launcher prints the one line of an interrupt, so they print none (cli.run_cli).
LAUNCHED_ENV = "ANOMALYCLIP_LAUNCHED"
AGENT_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api")
# Scripts of this project that run in one process: every rank would write the same outputs.
ONE_PROCESS_SCRIPTS = ("test_one_example.py", "export.py", "synthetic_dataset.py")
STOP_LINES = {int(signal.SIGINT): "interrupted", int(signal.SIGTERM): "terminated"}


class _QuietNotices(logging.Filter):
    """Drops the agent's notices about a rank's user error, a signal it received, and stopping the ranks."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (f"(exitcode: {USER_ERROR})" in message or "closing signal" in message
                    or "death signal" in message)


class _Terminated(Exception):
    """SIGTERM before torchrun's agent installed its own handler."""


def is_user_error(failure: ChildFailedError) -> bool:
    """Whether the ranks stopped on a user error: one exited with status 2, the others with it or stopped."""
    codes = [process.exitcode for process in failure.failures.values()]
    return USER_ERROR in codes and all(code == USER_ERROR or code in STOPPED for code in codes)


def stop_signal(failure: ChildFailedError) -> int | None:
    """SIGINT or SIGTERM when every failed rank ended on that signal (killed by it, or our CLIs' 128 + N)."""
    signals = {abs(code) if code < 0 else code - 128 for code in
               (process.exitcode for process in failure.failures.values())}
    return signals.pop() if len(signals) == 1 and signals <= set(STOP_LINES) else None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """torchrun's flags, with its mistakes (no script given, a bad value) as one line instead of its usage block."""
    parser = get_args_parser()
    parser.prog = "launch.py"

    def one_line(message: str) -> NoReturn:
        print(f"error: {message}; usage: python launch.py [torchrun flags] SCRIPT.py [its flags], see launch.py --help",
              file=sys.stderr)
        sys.exit(USER_ERROR)

    parser.error = one_line  # type: ignore[method-assign]
    args = parser.parse_args(list(argv))
    if not (args.module or args.no_python or Path(args.training_script).is_file()):
        one_line(f"the script {args.training_script} does not exist")
    if str(args.nproc_per_node).lstrip("-").isdigit() and int(args.nproc_per_node) < 1:
        one_line(f"--nproc_per_node {args.nproc_per_node} must be at least 1 (or auto, cpu, gpu)")
    script = Path(args.training_script).name
    if not args.module and script in ONE_PROCESS_SCRIPTS:
        one_line(f"{script} runs in one process (every rank would write the same files): run it with python, "
                 "not launch.py")
    return args


def _stopped(signum: int) -> int:
    print(STOP_LINES[signum], file=sys.stderr)
    return 128 + signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for name in AGENT_LOGGERS:
        logging.getLogger(name).addFilter(_QuietNotices())
    os.environ[LAUNCHED_ENV] = "1"  # inherited by the ranks
    previous = signal.signal(signal.SIGTERM, _raise_terminated)  # until the agent installs its own
    try:
        return _launch(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _launch(args: argparse.Namespace) -> int:
    try:
        run(args)
    except SignalException as stop:  # the agent passed the signal on to every rank and waited for them
        return _stopped(int(stop.sigval))
    except KeyboardInterrupt:
        return _stopped(int(signal.SIGINT))
    except _Terminated:
        return _stopped(int(signal.SIGTERM))
    except (ValueError, AssertionError) as exc:  # torchrun refused its flags (--nproc_per_node x, --nnodes 3:1)
        print(f"error: torchrun: {str(exc) or type(exc).__name__}; see launch.py --help", file=sys.stderr)
        return USER_ERROR
    except ChildFailedError as failure:
        if is_user_error(failure):
            return USER_ERROR
        signum = stop_signal(failure)
        if signum is not None:
            return _stopped(signum)
        print(failure.format_msg(), file=sys.stderr)
        return 1
    return 0
