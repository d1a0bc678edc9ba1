"""Stop signals: what a cluster sends before it takes the machine back.

SLURM sends SIGTERM before it pre-empts or cancels a job (or the signal `--signal` names, e.g.
SIGUSR1, some time before the end). While a long command runs (train, sft, sweep, cache-teacher,
generate), these signals only set a flag; the work loop finishes its unit in flight (an optimizer
step, a shard, a chunk), saves what it has, and raises Stopped. The CLI prints that as one line and
exits with EXIT_STOPPED, which a requeue script can test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

EXIT_STOPPED = 75  # EX_TEMPFAIL: "try again later", i.e. requeue and resume
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_requested: str | None = None
_forward_pid: int | None = None


class Stopped(Exception):
    """A stop signal arrived; what was finished is saved. The message says what was saved, then how
    to resume; a caller that runs the work for another command (sweep runs train) may re-raise it
    with its own `how_to_resume`."""

    def __init__(self, what: str, how_to_resume: str = "re-run the same command to continue"):
        super().__init__(what, how_to_resume)  # both in args: it pickles across processes unchanged
        self.what, self.how_to_resume = what, how_to_resume

    def __str__(self) -> str:
        return f"{self.what}: {self.how_to_resume}"


def _on_signal(signum, frame) -> None:
    global _requested
    _requested = signal.Signals(signum).name
    if _forward_pid is not None:
        with contextlib.suppress(OSError):
            os.kill(_forward_pid, signum)


def install() -> None:
    """Turn the stop signals into the flag (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _on_signal)


@contextlib.contextmanager
def handling():
    """Within the block the stop signals set the flag; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    install()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def requested() -> str | None:
    """The name of the stop signal received (e.g. "SIGTERM"), or None."""
    return _requested


def reset() -> None:
    global _requested
    _requested = None


def forward_to(pid: int | None) -> None:
    """Pass stop signals on to a child process (the pass running in it stops after its unit)."""
    global _forward_pid
    _forward_pid = pid


def raise_if_requested(resume_hint: str = "re-run the same command to continue") -> None:
    if _requested:
        raise Stopped(f"stopped by {_requested}: finished work is saved", resume_hint)
