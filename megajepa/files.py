"""Writing files and directories so that a reader never sees half of one: a temporary sibling,
renamed when complete, removed when writing fails."""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import sys
from contextlib import contextmanager
from typing import Iterator


def no_space(err: BaseException) -> bool:
    """Whether `err` comes of a full disk: an OSError ENOSPC in it or in what it was raised while
    handling (torch.save's zip writer answers a failed write with its own RuntimeError)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        err = err.__cause__ or err.__context__
    return False


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(final: str) -> list[str]:
    """Remove the staging siblings of `final` (`final.tmp-HOST-PID`, `final.old-HOST-PID`) left by
    dead processes of this host, e.g. a run killed by SIGKILL; returns what was removed. Another
    host's directories are left alone: its processes cannot be checked from here."""
    parent, base = os.path.split(final)
    pattern = re.compile(rf"^{re.escape(base)}\.(?:tmp|old)-{re.escape(socket.gethostname())}-(\d+)$")
    removed = []
    for name in os.listdir(parent or "."):
        match = pattern.match(name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(os.path.join(parent, name))
    return removed


@contextmanager
def staged_directory(final: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temporary sibling of `final`; when the block completes it becomes `final`.

    If the block raises (KeyboardInterrupt included; SIGTERM too, see main) the temporary
    directory is removed and `final` is left as it was. Stale siblings that dead processes left
    behind are removed first.
    """
    final = os.path.normpath(final)
    if _is_nonempty(final) and not overwrite:
        raise FileExistsError(f"{final}: exists and is not empty; pass --overwrite to replace it")
    if os.path.isdir(os.path.dirname(final) or "."):
        for path in remove_stale_staging(final):
            print(f"removed {path}: staging directory of a process that no longer runs", file=sys.stderr)
    owner = f"{socket.gethostname()}-{os.getpid()}"
    staging = f"{final}.tmp-{owner}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
        if _is_nonempty(final):  # --overwrite: retire the old one only once the new one is complete
            retired = f"{final}.old-{owner}"
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
