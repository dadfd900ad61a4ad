"""Stopping on a signal: a checkpoint and a clean exit at the end of the current step."""

from __future__ import annotations

import os
import signal
import time
from typing import Optional


class StopSignal:
    """SIGTERM / SIGUSR1 (preemption, a Slurm requeue) and SIGINT (Ctrl-C) ask for a checkpoint
    and a clean exit at the end of the current step; ranks agree on it so that they all save
    together. A second Ctrl-C aborts at once (the default SIGINT action), except within
    SIGINT_ECHO_SECONDS of the first: Ctrl-C reaches every process of the terminal's process group,
    torchrun included, and torchrun passes the SIGINT it got on to the ranks, a copy of the same
    Ctrl-C that must not abort the save."""

    SIGINT_ECHO_SECONDS = 2.0

    def __init__(self):
        self.received: Optional[int] = None
        self._first_sigint: Optional[float] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint > self.SIGINT_ECHO_SECONDS:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C: abort now
                return
            self._first_sigint = self._first_sigint or now
        self.received = self.received or signum

    def announce(self, step: int, rank: int) -> None:
        """Say on rank 0 that the ranks agreed to stop after `step`, and why."""
        if rank == 0:
            who = f"signal {self.received}" if self.received is not None else "a signal to another rank"
            print(f"stop requested ({who}): checkpointing step {step} and exiting", flush=True)
