"""The preemption latch: remembers that the requeue signal arrived, nothing more.

Slurm warns a job before preempting it or hitting its time limit (``sbatch --signal=B:USR2@60``
sends SIGUSR2 sixty seconds ahead). The handler only sets a flag; the training loop acts on it at
the next batch boundary, where model, optimizer, scheduler and loop counters are consistent.
Saving from inside the handler (what Lightning's own ``SLURMEnvironment(auto_requeue=True)``
does) can catch the optimizer mid-update and, under DDP, deadlocks when only some ranks got the
signal.

This module imports only the standard library: ``python -m hpctrain`` installs the latch before
importing torch and Lightning (seconds on a busy node), so a signal that arrives during startup
is recorded instead of killing the process with SIGUSR2's default action.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

DEFAULT_SIGNAL = "SIGUSR2"


def parse_signal(value: str | int | signal.Signals) -> signal.Signals:
    """Turn ``"SIGUSR2"``, ``"USR2"``, ``"12"`` or ``12`` into a :class:`signal.Signals`.

    :param value: a signal name (with or without the ``SIG`` prefix) or number.
    :raises ValueError: for unknown names and for signals that cannot be caught.
    """
    if isinstance(value, signal.Signals):
        sig = value
    elif isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        sig = signal.Signals(int(value))
    else:
        name = value.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        try:
            sig = signal.Signals[name]
        except KeyError:
            raise ValueError(f"unknown signal {value!r}") from None
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"{sig.name} cannot be caught; choose e.g. SIGUSR2 or SIGUSR1")
    return sig


class SignalLatch:
    """A one-way flag set by a signal handler.

    :param sig: the signal to catch.
    """

    def __init__(self, sig: str | int | signal.Signals = DEFAULT_SIGNAL) -> None:
        self.signal = parse_signal(sig)
        self._event = threading.Event()
        self._previous: object = None
        self._installed = False

    @property
    def triggered(self) -> bool:
        return self._event.is_set()

    def trigger(self) -> None:
        """Set the flag as if the signal had arrived (for callers that learn of preemption otherwise)."""
        self._event.set()

    def install(self) -> SignalLatch:
        """Install the handler; a no-op outside the main thread, where Python forbids it."""
        if not self._installed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signal, self._handle)
            self._installed = True
        return self

    def restore(self) -> None:
        """Put back the handler that was there before :meth:`install`."""
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(self.signal, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Async-signal context: set the flag and return; all real work happens in the loop.
        self._event.set()


_process_latch: SignalLatch | None = None


def install_process_latch(sig: str | int | signal.Signals = DEFAULT_SIGNAL) -> SignalLatch:
    """Install (once) the process-wide latch that the training run will consult.

    A later call with a different signal moves the handler to that signal but keeps a flag that is
    already set, so a signal caught during startup is not lost when the config names another one.

    :param sig: the signal to catch.
    """
    global _process_latch
    wanted = parse_signal(sig)
    if _process_latch is None:
        _process_latch = SignalLatch(wanted).install()
    elif _process_latch.signal != wanted:
        fired = _process_latch.triggered
        _process_latch.restore()
        _process_latch = SignalLatch(wanted).install()
        if fired:
            _process_latch.trigger()
    return _process_latch


def process_latch() -> SignalLatch | None:
    """The latch installed by :func:`install_process_latch`, if any."""
    return _process_latch


def reset_process_latch() -> None:
    """Remove the process-wide latch (tests run several trainings in one process)."""
    global _process_latch
    if _process_latch is not None:
        _process_latch.restore()
    _process_latch = None
