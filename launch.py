"""``torchrun`` whose user errors end as the one line of the rank that found it.

Usage: ``python launch.py [torchrun flags] SCRIPT [SCRIPT flags]``; see :mod:`pipeline.launch`.
"""

from pipeline.launch import main

if __name__ == "__main__":
    raise SystemExit(main())
