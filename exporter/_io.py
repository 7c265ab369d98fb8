"""Atomic output: write into a temporary sibling, rename into place only when complete.

``--force`` replaces only a directory a build wrote (it holds ``effexport.json``), never the current
directory, one of its ancestors or the model being exported (:func:`check_replaceable`); the swap
renames the old artifact aside, the new one in, and only then deletes the old one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile

from effexport.exporter.backends.artifact import MANIFEST
from effexport.exporter.errors import UsageError


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it (both already resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_replaceable(path: str, protected: tuple[str, ...] = ()) -> None:
    """Refuse (exit 2) to let ``--force`` replace ``path`` unless it is an effexport artifact directory
    that is not a symlink, not the current directory or an ancestor of it, and neither inside nor
    around any of ``protected`` (the model input)."""
    fix = "pass -o a new directory"
    if os.path.islink(path):
        raise UsageError(f"--force: {path!r} is a symbolic link; it is not replaced: {fix}")
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise UsageError(f"--force replaces only an effexport artifact directory; {path!r} is not a directory: "
                         f"{fix}")
    if _inside(os.path.realpath(os.getcwd()), real):
        raise UsageError(f"--force: {path!r} is the current directory or contains it; it is not replaced: {fix}")
    for other in protected:
        other = os.path.realpath(other)
        if _inside(other, real) or _inside(real, other):
            raise UsageError(f"--force: {path!r} holds or is inside the model being exported ({other}); it is "
                             f"not replaced: {fix}")
    if not os.path.isfile(os.path.join(real, MANIFEST)):
        raise UsageError(f"--force replaces only an effexport artifact (a directory with {MANIFEST}); {path!r} "
                         f"is not one: remove it yourself or {fix}")


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary path next to ``path`` (same suffix); on success it is renamed to ``path``, on
    any error (or KeyboardInterrupt) it is removed, so a failed run leaves no partial file."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=".effexport-", suffix=os.path.splitext(path)[1], dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the file gets a normal new file's mode
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _make_parents(parent: str) -> list[str]:
    """``os.makedirs(parent)``; returns the directories it created, deepest first."""
    created, probe = [], os.path.abspath(parent)
    while not os.path.exists(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    os.makedirs(parent, exist_ok=True)
    return created


def _remove_empty(directories: list[str]) -> None:
    for directory in directories:
        try:
            os.rmdir(directory)
        except OSError:
            break


@contextlib.contextmanager
def atomic_directory(path: str, force: bool = False):
    """Yield a temporary directory next to ``path``; renamed to ``path`` only on success. An existing
    ``path`` is replaced only with ``force`` (callers check it with :func:`check_replaceable` first):
    renamed aside, the new directory renamed in, then the old one deleted. On failure the temporary
    directory and any parent directories created for ``path`` are removed again."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    created = _make_parents(parent)
    try:
        tmp = tempfile.mkdtemp(prefix=".effexport-", dir=parent)
    except BaseException:
        _remove_empty(created)
        raise
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the artifact gets a normal directory's mode
    done = False
    try:
        yield tmp
        _swap_in(tmp, path, force)
        done = True
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            _remove_empty(created)


def _swap_in(tmp: str, path: str, force: bool) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` (``force``) is renamed aside first and deleted
    only once the new directory is in place (put back if that rename fails)."""
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    if not force:
        raise FileExistsError(path)
    aside = tempfile.mkdtemp(prefix=".effexport-old-", dir=os.path.dirname(os.path.abspath(path)))
    os.replace(path, aside)  # a directory replaces an empty directory atomically
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    if os.path.lexists(aside):
        print(f"effexport: warning: the replaced artifact could not be deleted completely; remove {aside}",
              file=sys.stderr)
