"""Stopping on a signal without losing work. SIGTERM (what `timeout`, SLURM, Kubernetes and systemd send, often
to every process of the job) and the first Ctrl-C ask the loop to checkpoint and stop (`StopRequest`); the data
loading workers leave both signals to the main process (`worker_context`, `ignore_stop_signals`) but still end
when the main process itself terminates them, as multiprocessing does at exit."""

import multiprocessing
import os
import signal
import threading

RESUME_HINT = 'resume_from_checkpoint="latest" (--resume_from_checkpoint latest)'
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# where pthread_sigmask and sigwaitinfo are missing (Windows), workers only ignore Ctrl-C
_MASKS = hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigwaitinfo")


class StopRequest:
    """SIGTERM and the first Ctrl-C ask the loop to checkpoint and stop at the end of the step; a second Ctrl-C
    stops at once."""

    signum = signal.SIGTERM  # the last signal received (SIGTERM when another process received it)

    def __init__(self, logger):
        self.requested, self.logger = False, logger
        self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, StopRequest.signum = True, signum
        self.logger.warning("received %s: writing a checkpoint, then stopping", signal.Signals(signum).name)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class TrainingStopped(Exception):
    """Raised by `train` after a signal asked it to stop: the checkpoint it wrote is `checkpoint`."""

    def __init__(self, signum: int, checkpoint: str):
        super().__init__(f"stopped by {signal.Signals(signum).name}; continue with {RESUME_HINT}")
        self.signum, self.checkpoint = signum, checkpoint


def worker_context():
    """The default multiprocessing context, whose processes start with SIGINT and SIGTERM blocked: a signal sent
    while a worker starts, before `ignore_stop_signals` runs in it, waits instead of killing it (the main
    process receives it a moment later). Blocking is inherited by fork only; other start methods keep that
    short window. -> a context for DataLoader(multiprocessing_context=...), or None (the default) on Windows."""
    if not _MASKS:
        return None
    base = multiprocessing.get_context()

    class Process(base.Process):
        def start(self):
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                super().start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    context = type(base)()
    context.Process = Process
    return context


def ignore_stop_signals(worker_id: int):
    """A data loading worker's init: Ctrl-C is ignored; SIGTERM is ignored unless the main process sent it
    (terminating its workers at exit, after an error), when the worker exits at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not _MASKS:
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # in every thread started from here on
    threading.Thread(target=_exit_when_the_parent_terminates, daemon=True, name="sigterm").start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending Ctrl-C is dropped: it is ignored


def _exit_when_the_parent_terminates():
    parent = os.getppid()
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)
