"""Errors that mean the user gave bad input (a missing file, a wrong layout, a mismatched checkpoint).

Library code raises :class:`AnomalyCLIPError` with one line that names the file and the fix;
command-line entry points catch it and print that line instead of a traceback.
"""

import errno
import re


class AnomalyCLIPError(Exception):
    """A user-facing error whose message is one line naming the offending input and the fix."""


class FlagError(AnomalyCLIPError):
    """A bad command line: found by every rank alike, so under torchrun only rank 0 prints it."""


class PeerFailed(AnomalyCLIPError):
    """Another rank hit a user error; that rank prints the line, this one stops quietly."""


def one_line(exc: BaseException) -> str:
    """The user-facing line of ``exc``, also when a DataLoader worker wrapped it in a traceback.

    A worker re-raises the error in the main process with a message that starts ``Caught
    AnomalyCLIPError in DataLoader worker process 0.`` and holds the worker's traceback; its last
    line (``...AnomalyCLIPError: <the line>``) is what the user needs.
    """
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        head, _, rest = last.partition(": ")
        text = rest if rest and head.endswith(("Error", "Exception")) else last
    return text.splitlines()[0] if text else type(exc).__name__


# Operating-system errors that are the user's to fix (full disk, read-only or forbidden folder, a file in
# the way of a folder).
_USER_OS_ERRORS = {
    errno.ENOSPC: "the disk is full: free space there or choose another folder",
    errno.EDQUOT: "the disk quota is used up: free space there or choose another folder",
    errno.EROFS: "the folder is on a read-only file system: choose a writable folder",
    errno.EFBIG: "the file would pass the file-size limit (ulimit -f) or the file system's largest file: "
                 "raise the limit or choose another folder",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path",
    errno.EEXIST: "a file of that name is in the way where a folder is needed: choose another path",
    errno.EISDIR: "that is a folder, where a file is needed: give a file name",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "permission denied: choose a folder you can write to",
}


def os_error_line(exc: OSError) -> str | None:
    """One line for an OSError a user can fix (naming the file), else ``None``."""
    advice = _USER_OS_ERRORS.get(exc.errno)
    if advice is None:
        return None
    where = f"cannot write {exc.filename}" if exc.filename else "cannot write a file"
    return f"{where}: {advice}"


# How torch words an allocation that failed: the CPU allocator, the CUDA caching allocator, a CUDA call.
_OUT_OF_MEMORY = re.compile(r"can't allocate memory|not enough memory|CUDA out of memory|CUDA error: out of memory")
_TRIED = re.compile(r"tried to allocate (\d+) bytes|Tried to allocate ([\d.]+ [KMGT]i?B)")


def out_of_memory_line(exc: BaseException) -> str | None:
    """One line for running out of memory (a batch or an image too large for the device), else ``None``."""
    if isinstance(exc, MemoryError):
        device, size = "the CPU", ""
    elif isinstance(exc, RuntimeError) and _OUT_OF_MEMORY.search(str(exc)):
        device = "the GPU" if "CUDA" in str(exc) else "the CPU"
        tried = _TRIED.search(str(exc))
        size = ""
        if tried:
            amount = f"{int(tried[1]) / 2**30:.1f} GiB" if tried[1] else tried[2]
            size = f" (an allocation of {amount})"
    else:
        return None
    return (f"out of memory on {device}{size}: lower --batch_size or --image_size, or free memory (other processes "
            "on that device)")


def user_error_line(exc: BaseException) -> str | None:
    """The line of any error the user fixes that is not an :class:`AnomalyCLIPError`: system and memory errors."""
    if isinstance(exc, OSError):
        return os_error_line(exc)
    return out_of_memory_line(exc)
