"""One run per train.output_dir: rank 0 holds a lock on `output_dir/.megajepa.lock` for the run's life.

Two runs writing one directory interleave their metrics and overwrite each other's checkpoints,
so the second refuses at start, naming the first's host and pid (written into the lock file).

The lock is flock(2) on that file, taken without waiting: the kernel releases it when the holder's
process ends, however it ends (SIGKILL, a crash), so a dead run never blocks the next one and no
stale-lock cleanup is needed. On a shared file system: Linux's NFS client maps flock onto NFS byte
-range locks, which the server holds across nodes (NFSv4: released within the lease time, about
90 s, after a client node dies); Lustre honours it across nodes when mounted with `-o flock`
(`localflock` makes it node-local, and with neither flock fails); GPFS and BeeGFS hold it across
nodes. Where the file system refuses locks altogether the run goes on, unprotected, after one line
saying so. A POSIX fcntl lock was not used: closing any descriptor of the file in the process
releases it, which a library opening the file would do unknowingly. The file itself stays (removing
it would race with a run opening it); its content is the last holder's.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from typing import Iterator

LOCK_FILE = ".megajepa.lock"


class RunLocked(RuntimeError):
    """Another live run holds this output_dir."""


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"host {info['host']}, pid {info['pid']}, since {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "host and pid not written yet"


@contextmanager
def held(output_dir: str, enabled: bool = True) -> Iterator[None]:
    """Hold output_dir's run lock for the block (when `enabled`: rank 0 only); RunLocked when
    another run holds it."""
    if not enabled:
        yield
        return
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(
                f"train.output_dir={output_dir}: another run is writing here ({_holder(fd)}; lock {path}); "
                "wait for it to end, or choose another train.output_dir"
            ) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            print(f"warning: {path}: this file system refuses locks ({err.strerror}): nothing stops a second run "
                  "from writing into train.output_dir meanwhile", file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started}).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
