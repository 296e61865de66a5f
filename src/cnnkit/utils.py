"""Small helpers shared across cnnkit: atomic file writes, device choice, seeding."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from cnnkit.errors import ConfigError, OutputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    A crash or exception inside the block leaves ``path`` untouched (old content or absent) and
    removes the temporary file, so readers never see a half-written file. A failed write (disk full,
    file too large, permission denied, read-only file system, a folder in the way) is an OutputError
    naming ``path``. A device or pipe (``/dev/stdout``) cannot be replaced: it is written in place.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; give the name of a file")
    if path.exists() and not path.is_file():
        try:
            yield path
        except Exception as exc:
            _raise_write_error(path, exc)
        return
    directory = path.parent if str(path.parent) else Path(".")
    created = first_missing(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        remove_empty_folders(directory, created)
        if exc.errno in (errno.EEXIST, errno.ENOTDIR):
            exc.strerror = f"{exc.filename or directory} is not a folder"
        _raise_write_error(path, exc, any_file=True)
    os.close(fd)
    tmp_path = Path(tmp)
    mode = 0o666 & ~_umask()
    os.chmod(tmp_path, mode)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)  # again: some writers (safetensors) replace the file with a 0600 one
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        kill_point(f"write {path.name}")
        os.replace(tmp_path, path)
        kill_point(f"rename {path.name}")
    except Exception as exc:
        tmp_path.unlink(missing_ok=True)
        remove_empty_folders(directory, created)
        _raise_write_error(path, exc, tmp_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def _raise_write_error(path: Path, exc: Exception, *temporary: Path, any_file: bool = False) -> NoReturn:
    """Raise ``exc``, raised while writing ``path`` (through ``temporary``), as an OutputError naming ``path``;
    errors about other files (a source being copied) and other exceptions are raised unchanged."""
    if isinstance(exc, OSError):
        ours = {str(p) for p in (path, *temporary)}
        if not any_file and exc.filename is not None and str(exc.filename) not in ours:
            raise exc
        reason, code = exc.strerror or str(exc), exc.errno
    else:
        # safetensors' writer (Rust) raises SafetensorError("... I/O error: <reason> (os error <errno>) ...")
        found = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(exc))
        if type(exc).__name__ != "SafetensorError" or not found:
            raise exc
        reason, code = found.group(1), int(found.group(2))
    fix = ("free some space or choose another output location" if code in _FULL else
           "choose a writable output location" if code in _DENIED else "choose another output location")
    raise OutputError(f"cannot write {path}: {reason}; {fix}") from None


_KILL_AT = os.environ.get("CNNKIT_KILL_AT")  # read once: the hook costs one comparison when unset
_kill_counts: dict[str, int] = {}


def kill_point(event: str) -> None:
    """Test hook: ``CNNKIT_KILL_AT="EVENT:N"`` kills this process with SIGKILL (no clean-up, as the OOM
    killer or a batch scheduler would) at the N-th ``EVENT``, so that tests can crash a real run at a chosen
    instant (tests/test_kill_resume.py). Events: ``write NAME`` (atomic_path's temporary file written,
    not yet renamed), ``rename NAME`` (renamed onto NAME), ``step`` (an optimizer step). Unset: nothing."""
    if _KILL_AT is None:
        return
    _kill_counts[event] = _kill_counts.get(event, 0) + 1
    if _KILL_AT == f"{event}:{_kill_counts[event]}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that files can be created in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # unnamed where the OS allows: a kill leaves no probe file
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.EEXIST, errno.ENOTDIR):  # a file where a folder should be
            reason = f"{exc.filename or path} is a file, not a folder"
        raise OutputError(f"output folder {path} is not writable ({reason}); pass a writable --out") from None
    return path


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, *, keep_complete: bool = False) -> Iterator[Path]:
    """:func:`ensure_writable_dir` for the block. If the block fails, the folders created here are removed
    again with what the block wrote into them, so that a failed command leaves nothing new behind; with
    ``keep_complete`` only folders left empty are removed (complete outputs that a rerun skips are kept)."""
    path = Path(path)
    created = first_missing(path)
    try:
        yield ensure_writable_dir(path)
    except BaseException:
        if created is not None and not keep_complete:
            shutil.rmtree(created, ignore_errors=True)
        remove_empty_folders(path, created)
        raise


def first_missing(path: Path) -> Path | None:
    """The topmost of ``path`` and its parents that does not exist (None when ``path`` exists)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def remove_empty_folders(path: Path, top: Path | None) -> None:
    """Remove ``path`` and its parents up to ``top`` (folders created here), as long as they are empty."""
    if top is None:
        return
    for folder in (path, *path.parents):
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone)
            return
        if folder == top:
            return


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:N`` are taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that a CPU run repeats bit for bit."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
