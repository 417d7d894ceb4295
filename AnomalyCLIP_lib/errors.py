"""Errors that mean the user gave bad input (a missing file, a wrong layout, a mismatched checkpoint).

Library code raises :class:`AnomalyCLIPError` with one line that names the file and the fix;
command-line entry points catch it and print that line instead of a traceback.
"""

import errno
import os
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


# Operating-system errors that are the user's to fix, met writing (full disk, read-only or forbidden folder, a file
# in the way of a folder). The one place where an errno becomes a cause and a fix: every line below is built here.
_WRITE_ADVICE = {
    errno.ENOSPC: "the disk is full: free space there or choose another folder",
    errno.EDQUOT: "the disk quota is used up: free space there or choose another folder",
    errno.EROFS: "the folder is on a read-only file system: choose a writable folder",
    errno.EFBIG: "the file would pass the file-size limit (ulimit -f) or the file system's largest file: "
                 "raise the limit or choose another folder",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path",
    errno.EEXIST: "a file of that name is in the way where a folder is needed: choose another path",
    errno.EISDIR: "that is a folder, where a file is needed: give a file name",
    errno.EACCES: "permission denied: fix the folder's permissions (chmod/chown) or choose a folder you can write to",
    errno.EPERM: "permission denied: fix the folder's permissions (chmod/chown) or choose a folder you can write to",
}
_PERMISSION = frozenset({errno.EACCES, errno.EPERM})


def write_error_advice(exc: OSError) -> str | None:
    """The cause and fix of an OSError met writing (``"the disk is full: free space ..."``), else ``None``."""
    return _WRITE_ADVICE.get(exc.errno)


def write_error_line(exc: OSError, path: object = None) -> str | None:
    """One line for an OSError met writing ``path`` (default: the error's file) a user can fix, else ``None``."""
    advice = write_error_advice(exc)
    if advice is None:
        return None
    target = path if path is not None else exc.filename
    where = f"cannot write {target}" if target else "cannot write a file"
    return f"{where}: {advice}"


def read_error_line(exc: OSError, path: object = None, what: str = "") -> str | None:
    """One line for an OSError met reading a file whose cause is not the file's content, else ``None``.

    A file that cannot be read for its permissions, because it is a folder, or because the disk
    fails is not corrupt: the line names that cause and its fix, so that callers say "corrupt"
    or "re-create it" only for the errors this returns ``None`` for.

    Args:
        exc: The error.
        path: The file (default: the error's file).
        what: How to name the file (``"meta.json"``, ``"image file"``).
    """
    target = path if path is not None else exc.filename
    name = " ".join(str(part) for part in (what, target) if part) or "a file"
    if exc.errno in _PERMISSION:
        return (f"permission denied reading {name}: fix its permissions (chmod/chown) or run as a user who may "
                "read it")
    if exc.errno == errno.EISDIR:
        return f"cannot read {name}: it is a folder, where a file is needed: give a file"
    if exc.errno == errno.EIO:
        return (f"cannot read {name}: input/output error (the disk or the network share failed): check the device, "
                "or copy the file again from a good source")
    return None


def _unreadable(filename: object) -> bool:
    """An existing file (or folder) this process may not read: a permission error on it was met reading."""
    if not isinstance(filename, (str, bytes)) and not hasattr(filename, "__fspath__"):
        return False
    return os.path.lexists(filename) and not os.access(filename, os.R_OK)


def os_error_line(exc: OSError) -> str | None:
    """One line for an OSError a user can fix (naming the file), else ``None``.

    A permission error on a file that exists and may not be read was met reading it; any other
    error of the table was met writing.
    """
    if exc.errno in _PERMISSION and _unreadable(exc.filename):
        return read_error_line(exc)
    return write_error_line(exc)


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
