"""Preemption: SIGTERM / SIGUSR1 stop a training run at a step boundary with a checkpoint.

Clusters warn a job before they kill it: SLURM preemption, Kubernetes eviction and spot reclaim
send SIGTERM (usually 30-120 s before SIGKILL), and SLURM's `--signal=USR1@SECONDS` sends SIGUSR1
earlier still. While `Trainer.fit` runs, `StopSignals` turns either signal into a request: the
handler only records it (it never interrupts a step or a write), the trainer finishes the step in
progress, all ranks agree to stop at the same step boundary (`dist.agree`), one checkpoint is
written, and the run ends with `Preempted`, which `calrft train` reports as one line and exit
status `EXIT_PREEMPTED` (75, sysexits' EX_TEMPFAIL: "try again later", i.e. resume). A further
signal while stopping (during the save) is recorded and otherwise ignored, so it cannot tear the
checkpoint; SIGKILL of course still ends the process, and the atomic write then leaves the
previous checkpoint in place.

A data-loader worker's death is reported by the DataLoader's SIGCHLD handler, which raises in the
main thread wherever it happens to be, mid-step included (a SLURM preemption signals the workers
too). While `StopSignals` is active that report is held back to the next batch fetch (`fetch()`),
a step boundary, where the trainer can still save a consistent state."""
from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """A run stopped by a preemption signal after `step` of `total` steps, its state saved in
    `path` (None on ranks other than the writer's)."""

    def __init__(self, signame: str, step: int, total: int, path: str | None):
        self.signame, self.step, self.total, self.path = signame, step, total, path
        where = (f"rerun the same command with --resume {path} to continue" if path else
                 "rank 0 wrote the checkpoint")
        super().__init__(f"stopped by {signame} after step {step} of {total}, saved; {where}")


class StopSignals:
    """Context manager: while active, SIGTERM and SIGUSR1 set `requested` (the first signal's
    name) instead of ending the process; `count` says how many arrived. The previous handlers are
    restored on exit. Outside the main thread (where Python cannot install handlers) it does
    nothing and the signals keep their previous behaviour."""

    def __init__(self, signals=SIGNALS):
        self.signals = tuple(signals)
        self.requested: str | None = None
        self.count = 0
        self._previous = {}
        self._active = self._fetching = self._child_exited = False
        self._loader_handler = None        # the DataLoader's SIGCHLD handler, held back

    def _handle(self, signum, frame):  # only records: safe at any point of a step or a write
        self.count += 1
        if self.requested is None:
            self.requested = signal.Signals(signum).name

    def _child(self, signum, frame):   # a child process ended: check workers at a fetch only
        if self._fetching:
            self._loader_handler(signum, frame)
        else:
            self._child_exited = True

    @contextlib.contextmanager
    def fetch(self):
        """Around a batch fetch: a worker death reported since the last fetch (or during this
        one) raises the DataLoader's RuntimeError here, not mid-step."""
        if self._active:
            current = signal.getsignal(signal.SIGCHLD)
            if callable(current) and current != self._child:  # a DataLoader installed its handler
                self._loader_handler = current
                signal.signal(signal.SIGCHLD, self._child)
        self._fetching = True
        try:
            if self._child_exited and self._loader_handler is not None:
                self._child_exited = False
                self._loader_handler(signal.SIGCHLD, None)
            yield
        finally:
            self._fetching = False

    def __enter__(self):
        self._active = threading.current_thread() is threading.main_thread()
        if self._active:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._active and signal.getsignal(signal.SIGCHLD) == self._child:
            signal.signal(signal.SIGCHLD, self._loader_handler)
        self._active = False
        return False
