"""``torchrun`` that ends a user error as the one line of the rank that found it.

Usage: ``python launch.py [torchrun flags] SCRIPT [SCRIPT flags]``, e.g.
``python launch.py --nproc_per_node 2 test.py --data_path ./data/visa ...``. Every flag of
``torchrun`` works (this runs torch's own launcher). When the ranks stop on a user error (a rank
printed ``error: ...`` and exited with status 2, the others stopped with it), torchrun follows
that line with a traceback of its own and a failure summary; this launcher adds nothing and exits
with status 2. Any other failure (a crash, a signal) gets torchrun's summary and status 1.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.getLogger(AGENT_LOGGER).addFilter(_UserErrorNotices())
    try:
        run(args)
    except ChildFailedError as failure:
        if is_user_error(failure):
            return USER_ERROR
        print(failure.format_msg(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
