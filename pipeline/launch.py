"""``torchrun`` that ends a user error as the one line of the rank that found it.

Usage: ``python launch.py [torchrun flags] SCRIPT [SCRIPT flags]``, e.g.
``python launch.py --nproc_per_node 2 test.py --data_path ./data/visa ...``. Every flag of
``torchrun`` works (this runs torch's own launcher). When the ranks stop on a user error (a rank
printed ``error: ...`` and exited with status 2, the others stopped with it), torchrun follows
that line with a traceback of its own and a failure summary; this launcher adds nothing and exits
with status 2. Any other failure (a crash, a signal) gets torchrun's summary and status 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

USER_ERROR = 2  # the exit status of our CLIs on a user error (cli.run_cli)
# A rank torchrun stopped because another one had exited: killed by SIGTERM, or our CLIs' exit on it (128 + 15).
STOPPED = (-int(signal.SIGTERM), 128 + int(signal.SIGTERM))
AGENT_LOGGER = "torch.distributed.elastic.multiprocessing.api"


class _UserErrorNotices(logging.Filter):
    """Drops the agent's notices about a rank that exited with a user error, and about stopping the others."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return f"(exitcode: {USER_ERROR})" not in message and "closing signal SIGTERM" not in message


def is_user_error(failure: ChildFailedError) -> bool:
    """Whether the ranks stopped on a user error: one exited with status 2, the others with it or stopped."""
    codes = [process.exitcode for process in failure.failures.values()]
    return USER_ERROR in codes and all(code == USER_ERROR or code in STOPPED for code in codes)


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
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.getLogger(AGENT_LOGGER).addFilter(_UserErrorNotices())
    try:
        run(args)
    except (ValueError, AssertionError) as exc:  # torchrun refused its flags (--nproc_per_node x, --nnodes 3:1)
        print(f"error: torchrun: {exc}; see launch.py --help", file=sys.stderr)
        return USER_ERROR
    except ChildFailedError as failure:
        if is_user_error(failure):
            return USER_ERROR
        print(failure.format_msg(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
