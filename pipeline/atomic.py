"""Atomic file writes: write to a temporary file beside the target, then rename over it.

A crash or Ctrl-C mid-write leaves the previous file (or none), never a half-written one.
Kept free of heavy imports so the dataset indexers can use it. :func:`locked_folder` keeps two
runs from writing into one output folder at once; :func:`deferred_signals` keeps Ctrl-C and
SIGTERM out of the renames of :func:`atomic_write_texts`; :class:`StagedOutputs` swaps a whole
run's files into its folder as one.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from AnomalyCLIP_lib.errors import AnomalyCLIPError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, folders are not locked
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK_NAME = ".anomalyclip.lock"
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], durable: bool = True) -> Path:
    """Call ``write(temporary_path)``, then move the temporary file onto ``path``.

    An ``OSError`` (full disk, read-only folder, file-size limit) names ``path``, not the
    temporary file.

    Args:
        durable: Flush the temporary file to the disk before the rename, so that a power cut
            too leaves the old file or the new one (off for many small, re-creatable files
            such as overlays, where one flush per file would cost more than the write).

    Returns:
        ``path`` as a :class:`Path`.
    """
    path = Path(path)
    with naming_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            write(tmp_name)
            _finish(tmp_name, durable)
            os.replace(tmp_name, path)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
    return path


@contextlib.contextmanager
def naming_errors(path: Path) -> Iterator[None]:
    """Re-raise an ``OSError`` with ``path`` as its file name (a write error carries none)."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None or exc.filename == str(path):
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def _finish(tmp_name: str, durable: bool = True) -> None:
    """Usual permissions (mkstemp makes 0600) and, if ``durable``, the data on the disk before the rename."""
    os.chmod(tmp_name, 0o666 & ~_umask())
    if not durable:
        return
    fd = os.open(tmp_name, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_bytes(data: bytes | memoryview, path: str | os.PathLike, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (``durable``: see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), durable)


def atomic_torch_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically.

    The object is serialised in memory and written by Python: torch's own file writer turns a
    full disk into an internal message ("unexpected pos ..."), Python raises the ``OSError`` it is.
    """
    import torch  # here, so that the dataset indexers can import this module without torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(buffer.getbuffer(), path)


def atomic_write_texts(texts: dict[str | os.PathLike, str]) -> list[Path]:
    """Write several text files so that a failure leaves all the old ones or all the new ones.

    Every temporary file is written first; only when all succeeded are they renamed into place
    (a rename cannot fail for lack of space). Ctrl-C or SIGTERM during the renames takes effect
    after the last one (:func:`deferred_signals`); before them, it leaves the old files.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, text in texts.items():
            path = Path(path)
            with naming_errors(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                staged.append((tmp_name, path))
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(text)
                _finish(tmp_name)
        with deferred_signals():
            for tmp_name, path in staged:
                os.replace(tmp_name, path)
    finally:
        for tmp_name, _ in staged:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
    return [path for _, path in staged]


@contextlib.contextmanager
def deferred_signals(signums: tuple[int, ...] = DEFERRED_SIGNALS) -> Iterator[None]:
    """Hold ``signums`` back while the block runs; one that arrives meanwhile takes effect at its end.

    Their handlers are swapped for one that notes them; afterwards the handlers are put back and
    each noted signal is raised again, so its usual handler runs (an exception, or the default
    action: the process ends). Blocking them with ``pthread_sigmask`` would not do: a mask is per
    thread, and the kernel hands a signal the main thread blocks to another thread (torch's OpenMP
    pool, tqdm's monitor), whose Python handler then still runs in the main thread mid-block, or
    whose default action still ends the process. Handlers can only be set in the main thread:
    elsewhere, and for a signal that is ignored or whose handler was not set from Python (it could
    not be put back), the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []

    def note(signum: int, _frame: object) -> None:
        arrived.append(signum)

    previous: dict[int, Callable | int] = {}
    try:
        for signum in signums:
            handler = signal.getsignal(signum)
            if handler is None or handler == signal.SIG_IGN:
                continue
            previous[signum] = handler  # first: a signal landing next must not leave ``note`` installed
            try:
                signal.signal(signum, note)
            except (ValueError, OSError):  # not the main interpreter, or a platform without this signal
                del previous[signum]
        yield
    finally:
        try:
            _put_back(list(previous.items()))
        finally:
            for signum in dict.fromkeys(arrived):
                signal.raise_signal(signum)


def _put_back(handlers: list[tuple[int, Callable | int]]) -> None:
    """Reinstall ``handlers``, every one even if a signal that arrives meanwhile raises in between."""
    if not handlers:
        return
    (signum, handler), *rest = handlers
    try:
        signal.signal(signum, handler)
    finally:
        _put_back(rest)


def remove_leftovers(folder: str | os.PathLike, pattern: str) -> list[Path]:
    """Delete the temporary files a killed atomic write of ``folder/pattern`` left behind.

    ``pattern`` is a glob of target names (``"epoch_*.pth"``); only files named like our
    temporaries (``.<target>.<random>.tmp``) are touched.
    """
    removed = []
    for leftover in Path(folder).glob(f".{pattern}.*.tmp"):
        if leftover.is_file():
            leftover.unlink()
            removed.append(leftover)
    return removed


def reserve_blocks(path: str | os.PathLike) -> None:
    """Allocate the blocks of the file at ``path`` (of its current size) now.

    Writing a file through a memory map on a full disk kills the process (SIGBUS); reserved
    blocks cannot run out. A file system that cannot reserve is left as it is.

    Raises:
        OSError: The disk has no room (ENOSPC, EDQUOT), naming ``path``.
    """
    if not hasattr(os, "posix_fallocate"):
        return
    with naming_errors(Path(path)):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # those: the file system cannot reserve
                raise
        finally:
            os.close(fd)


@contextlib.contextmanager
def locked_folder(folder: str | os.PathLike, flag: str) -> Iterator[Path]:
    """Hold ``folder`` (made if missing) for this process alone while the block runs.

    A second run given the same folder stops at once with one line, instead of interleaving its
    log and replacing the other run's files. The lock is the kernel's (``flock`` on
    ``folder/.anomalyclip.lock``): a killed run holds it no more, and the file is removed on exit,
    as are the folder and its parents that this made, while they stayed empty.

    Args:
        folder: The output folder.
        flag: The flag that named it, for the error line (``"--save_path"``).

    Raises:
        AnomalyCLIPError: Another process holds the folder.
    """
    folder = Path(folder)
    made = _missing_folders(folder)
    with naming_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield folder
        return
    lock_path = folder / LOCK_NAME
    fd = _lock(lock_path, flag, folder)
    try:
        yield folder
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # while still held: a run that opened it meanwhile sees it gone and retries
        os.close(fd)
        _remove_if_empty(made)  # made here and left empty (a run that failed early): not left behind


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its parents that do not exist yet, deepest first."""
    missing = []
    for part in (folder, *folder.parents):
        if part.exists():
            break
        missing.append(part)
    return missing


def _remove_if_empty(folders: list[Path], stop: bool = True) -> None:
    """Remove ``folders`` (deepest first) while they are empty (``stop``: at the first that is not)."""
    for part in folders:
        try:
            part.rmdir()
        except OSError:
            if stop:
                return


def _lock(lock_path: Path, flag: str, folder: Path) -> int:
    """A descriptor of ``lock_path`` holding its exclusive lock (the file is the one at that path)."""
    while True:
        with naming_errors(lock_path):
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise AnomalyCLIPError(f"{flag} {folder} is in use by another run{holder}: wait for it to end, "
                                   "or choose another folder") from None
        except OSError:
            os.close(fd)  # a file system without locks (some network mounts): go on unlocked
            return os.open(os.devnull, os.O_RDONLY)
        try:
            same_file = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same_file = False
        if same_file:  # else the previous holder removed it after we opened it: lock the new one
            with contextlib.suppress(OSError):  # the pid only helps the message; a full disk is found by the run
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (process {pid})" if pid.isdigit() else ""


# --- one run's outputs in a folder ---------------------------------------------------------------

STAGING_NAME = ".anomalyclip-staging"
OUTPUTS_NAME = ".anomalyclip-outputs.json"


class StagedOutputs:
    """A run's outputs, written under ``folder/.anomalyclip-staging`` and swapped in as one at the end.

    A folder holds one run's outputs: :meth:`commit` removes the files of the folder's previous
    run (listed in ``folder/.anomalyclip-outputs.json``; for a folder written before that list
    existed, the files matching ``earlier``), moves the staged files into place and lists them,
    with Ctrl-C and SIGTERM held back until it is done. A run that fails or is interrupted before
    it leaves the previous run's files as they were; its staging folder is removed then, or by
    the next run (:meth:`prepare`) if the process was killed. Files of the user's own, and the
    appended ``log.txt``, are never touched.

    Args:
        folder: The output folder (held with :func:`locked_folder`).
        earlier: Globs (relative to ``folder``) of the files an earlier version of this run wrote.
    """

    def __init__(self, folder: str | os.PathLike, earlier: tuple[str, ...] = ()) -> None:
        self.folder = Path(folder)
        self.staging = self.folder / STAGING_NAME
        self.earlier = earlier
        self._beside: dict[Path, Path] = {}

    def prepare(self) -> Path:
        """An empty staging folder (a killed run's is removed first); returns it."""
        self.discard()
        with naming_errors(self.staging):
            self.staging.mkdir(parents=True)
        return self.staging

    def beside(self, target: str | os.PathLike) -> Path:
        """Where to write ``target``, a file outside the folder (``--dump``), to move it in at :meth:`commit`.

        A file inside the folder is staged in the staging folder; one outside it beside itself (a
        rename across file systems is not possible).
        """
        target = Path(target)
        resolved, folder = target.resolve(), self.folder.resolve()
        if resolved.is_relative_to(folder):
            return self.staging / resolved.relative_to(folder)
        staged = target.parent / f".{target.name}.anomalyclip-staged{target.suffix}"  # same suffix: same type
        self._beside[staged] = target
        return staged

    def discard(self) -> None:
        """Remove what was staged (the folder's files stay as they were)."""
        for staged in self._beside:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
        if self.staging.is_dir() and not self.staging.is_symlink():
            shutil.rmtree(self.staging)
        elif self.staging.is_symlink() or self.staging.exists():
            self.staging.unlink()

    def commit(self) -> list[Path]:
        """Replace the previous run's files with the staged ones; returns the files now in the folder."""
        new = [path.relative_to(self.staging) for path in sorted(self.staging.rglob("*")) if not path.is_dir()]
        staged_now = set(new)
        old = [path for path in self._previous() if path not in staged_now]
        with deferred_signals():
            # Listed first: a crash in the swap leaves a list from which the next run removes them all.
            self._write_list(sorted(set(old) | set(new)))
            for relative in old:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    (self.folder / relative).unlink()
            for relative in new:
                target = self.folder / relative
                with naming_errors(target):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(self.staging / relative, target)
            for staged, target in self._beside.items():
                if staged.exists():
                    with naming_errors(target):
                        os.replace(staged, target)
            self._write_list(new)
            _remove_if_empty(sorted({parent for relative in old for parent in (self.folder / relative).parents
                                     if parent.is_relative_to(self.folder) and parent != self.folder},
                                    key=lambda path: len(path.parts), reverse=True), stop=False)
        shutil.rmtree(self.staging, ignore_errors=True)
        return [self.folder / relative for relative in new]

    def _previous(self) -> list[Path]:
        """The files of the folder's previous run, relative to it (never a path outside it)."""
        listed = self.folder / OUTPUTS_NAME
        try:
            names = json.loads(listed.read_text(encoding="utf-8"))["files"]
        except FileNotFoundError:
            names = [path.relative_to(self.folder).as_posix() for pattern in self.earlier
                     for path in self.folder.glob(pattern) if STAGING_NAME not in path.parts]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("%s cannot be read (%s): the previous run's files are not removed", listed, exc)
            return []
        folder = self.folder.resolve()
        safe = []
        for name in names:
            relative = Path(str(name))
            if relative.is_absolute() or ".." in relative.parts or not (folder / relative).resolve().is_relative_to(
                    folder):
                continue
            safe.append(relative)
        return safe

    def _write_list(self, files: list[Path]) -> None:
        atomic_write_text(json.dumps({"files": [path.as_posix() for path in files]}, indent=1) + "\n",
                          self.folder / OUTPUTS_NAME)


@contextlib.contextmanager
def staged_outputs(folder: str | os.PathLike, earlier: tuple[str, ...] = ()) -> Iterator[StagedOutputs]:
    """A prepared :class:`StagedOutputs`; what was not committed when the block ends is removed."""
    stage = StagedOutputs(folder, earlier)
    stage.prepare()
    try:
        yield stage
    finally:
        stage.discard()
