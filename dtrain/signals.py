"""Stop signals. SIGTERM/SIGUSR1/SIGUSR2 (how SLURM, submitit and torchrun announce preemption or
teardown) and a first Ctrl-C (SIGINT) are recorded for the training loop to act on at its next step: it
checkpoints and exits (75, or 130 after Ctrl-C). A second Ctrl-C stops at once. A handler that was
installed before dtrain's (submitit's, which requeues the job) gets the signal once the checkpoint is saved.

Clusters, `timeout`, terminals and container runtimes signal the whole process group, DataLoader workers
included. Workers must neither die of these signals (the trainer would fail with "DataLoader worker ...
killed by signal" instead of saving) nor act on them: they are forked with the signals blocked
(`blocked_in_children`) and drop any that does not come from their parent (`ignore_in_worker`)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator, Optional

from dtrain import errors


def name(signum: int) -> str:
    return signal.Signals(signum).name


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


@contextlib.contextmanager
def blocked_in_children() -> Iterator[None]:
    """Block the stop signals in this thread while child processes are started: a child inherits the
    mask, so a signal sent to the group while it starts stays pending until it has set them to be
    ignored (then it is dropped). This process still gets them: the kernel hands a process-wide signal
    to a thread that does not block it, and Python runs the handler in the main thread as usual."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_in_worker() -> None:
    """In a data worker process, started with the stop signals blocked (`blocked_in_children`): they stay
    blocked, and a thread takes each one as it comes. One from the parent (the loader shutting the worker
    down, or multiprocessing at the parent's exit) ends the worker as before; any other (a signal to the
    whole group) is dropped: the trainer acts on it and shuts its workers down itself."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    parent = os.getppid()

    def take() -> None:
        while True:
            if signal.sigwaitinfo(STOP_SIGNALS).si_pid == parent:
                os._exit(0)

    threading.Thread(target=take, name="dtrain-stop-signals", daemon=True).start()


class StopSignal:
    """Records the first stop signal. A rank stuck where the loop cannot act (a collective whose peer
    died) would never get there, so the first signal also arms a watchdog that exits after `grace_s`."""

    SIGNALS = STOP_SIGNALS

    def __init__(self, grace_s: float):
        self.received: Optional[int] = None
        self.grace_s = grace_s
        self._watchdog: Optional[threading.Timer] = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            if signum == signal.SIGINT:
                print("dtrain: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again stops at once)",
                      file=sys.stderr, flush=True)
            self._watchdog = threading.Timer(self.grace_s, self._expire, args=(signum,))
            self._watchdog.daemon = True
            self._watchdog.start()
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def _expire(self, signum: int) -> None:
        print(f"dtrain: no clean stop within trainer.stop_grace_s={self.grace_s:g}s of {name(signum)} "
              "(stuck in a collective?); exiting", file=sys.stderr, flush=True)
        if errors.recorded is None:  # else its own verdict stands (it crashed, then its teardown hung)
            errors.record_exit_code(128 + signum)
        os._exit(128 + signum)

    def hand_on(self, signum: int) -> None:
        """Give `signum` to the Python handler that was there before ours, now that we have checkpointed
        (under Hydra's submitit launcher that handler requeues the job and exits)."""
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, None)

    def restore(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for s, h in self._previous.items():
            signal.signal(s, h)
