"""Writing files and directories so that a reader never sees half of one: a temporary sibling,
renamed when complete, removed when writing fails."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary name beside `path`; it becomes `path` when the block succeeds."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def _is_nonempty(path: str) -> bool:
    return os.path.exists(path) and (not os.path.isdir(path) or bool(os.listdir(path)))


@contextmanager
def staged_directory(final: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temporary sibling of `final`; when the block completes it becomes `final`.

    If the block raises (KeyboardInterrupt included) the temporary directory is removed and
    `final` is left as it was.
    """
    final = os.path.normpath(final)
    if _is_nonempty(final) and not overwrite:
        raise FileExistsError(f"{final}: exists and is not empty; pass --overwrite to replace it")
    staging = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
        if _is_nonempty(final):  # --overwrite: retire the old one only once the new one is complete
            retired = f"{final}.old-{os.getpid()}"
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
