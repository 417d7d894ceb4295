"""Errors that mean the user gave bad input (a missing file, a wrong layout, a mismatched checkpoint).

Library code raises :class:`AnomalyCLIPError` with one line that names the file and the fix;
command-line entry points catch it and print that line instead of a traceback.
"""


class AnomalyCLIPError(Exception):
    """A user-facing error whose message is one line naming the offending input and the fix."""
