"""Atomic output: write into a temporary sibling, rename into place only when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on any error
    (or KeyboardInterrupt) it is removed, so a failed run leaves no partial file."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=".effexport-", suffix=os.path.splitext(path)[1], dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_directory(path: str, force: bool = False):
    """Yield a temporary directory next to ``path``; renamed to ``path`` only on success (an existing
    ``path`` is replaced only with ``force``)."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".effexport-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the artifact gets a normal directory's mode
    try:
        yield tmp
        if os.path.exists(path):
            if not force:
                raise FileExistsError(path)
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
