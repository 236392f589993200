"""Crash-safe writes: a temporary sibling, fsync, rename. A kill -9 at any moment leaves either
the old file (or directory) or the new one, never a torn one."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import OutputPathError


def fsync_dir(path: Path) -> None:
    """Persist a directory entry (a rename); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fresh(parent: Path, prefix: str, make: Callable[[Path], Any]) -> Path:
    """A new unique path ``parent/prefix<random>`` created by ``make`` (which must fail if it exists).

    Unlike ``tempfile.mkstemp`` / ``mkdtemp`` (modes 0600 / 0700), ``make`` creates it with the mode the
    process's umask gives, so the renamed result has the permissions of a file written in place.
    """
    for _ in range(100):
        cand = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            make(cand)
        except FileExistsError:
            continue
        return cand
    raise FileExistsError(f"no free temporary name {prefix}* in {parent}")


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def output_problem(path: str | os.PathLike[str], kind: str) -> str | None:
    """Why a new ``kind`` (``"file"`` or ``"directory"``) cannot be written at ``path``, or None.

    It cannot when ``path`` exists as the other kind (a regular file is never swapped for a
    directory, nor a directory for a file) or when the nearest existing parent is not a directory.
    """
    p = Path(path)
    if kind == "directory" and (p.exists() or p.is_symlink()) and not p.is_dir():
        return (f"{p} exists and is not a directory; refusing to replace it with a directory "
                "(remove it or choose another path)")
    if kind == "file" and p.is_dir():
        return f"{p} is a directory; expected the path of a file to write (e.g. {p / 'out.json'})"
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is not a directory, so {p} cannot be created below it"
            break
    return None


def check_output(path: str | os.PathLike[str], kind: str) -> Path:
    """``path`` as a Path; :class:`~lorakit.errors.OutputPathError` if :func:`output_problem` objects."""
    problem = output_problem(path, kind)
    if problem:
        raise OutputPathError(problem)
    return Path(path)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], Any], mode: str = "wb") -> None:
    """Call ``write(fileobj)`` on a temporary file next to ``path``, fsync it, rename it onto ``path``.

    A directory at ``path`` (or a file among its parents) raises :class:`OutputPathError` first.
    """
    p = check_output(path, "file")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh(p.parent, f".{p.name}.tmp-", _new_file)
    try:
        with open(tmp, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)


def atomic_dir(final: str | os.PathLike[str], fill: Callable[[Path], Any]) -> None:
    """Build a directory under a temporary name with ``fill(tmp)``, fsync every file, swap it in.

    An existing directory is replaced; an existing regular file (or a file among the parents) raises
    :class:`OutputPathError` before anything is written.
    """
    final = check_output(final, "directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh(final.parent, f".{final.name}.tmp-", lambda d: d.mkdir(0o777))
    old = None
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old is not None and old.exists() and not final.exists():  # the swap failed halfway: the previous back
            os.replace(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
