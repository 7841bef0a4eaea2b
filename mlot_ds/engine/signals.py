"""Preemption signals: SIGUSR1 (SLURM's warning before the time limit) and SIGTERM.

The handler only records the request; the trainer checks it after every step (all-reduced, so one
rank receiving the signal is enough), saves a checkpoint and exits with :data:`REQUEUE_EXIT_CODE`.
It is installed first thing in ``main``, before the slow imports, so an early signal is not fatal.
"""

from __future__ import annotations

import signal

# Exit status after a checkpoint on SIGUSR1/SIGTERM; launch/slurm/train.sbatch turns it into a requeue.
REQUEUE_EXIT_CODE = 75

STOP_REQUEST: dict[str, int | None] = {"signal": None}


def install_stop_handlers() -> None:
    def request_stop(signum, frame):
        STOP_REQUEST["signal"] = signum

    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, request_stop)
