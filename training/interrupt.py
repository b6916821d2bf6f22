"""Ctrl-C and SIGTERM: the first stops the run at its next safe point, the second at once.

The first signal is acknowledged on standard error at once and only sets a flag; the loop reads it
between steps and between evaluation batches (the start-up between its phases, sampling between
chunks of characters), then ends with a checkpoint of the last completed step. A second signal ends
the process at once, without a traceback. Either way the exit status is 128 + the signal's number,
as a shell reports a process killed by it: 130 for SIGINT, 143 for SIGTERM.

"At once" even while the main thread is inside one long torch call (a forward of the seed's model
on a CPU takes seconds, and Python runs signal handlers only between bytecodes): the signal's
number is written to a pipe by the interpreter's C-level handler (signal.set_wakeup_fd), and a
watcher thread that waits on that pipe acknowledges the first signal and ends the process on the
second. The Python-level handlers do nothing; they are there so that no KeyboardInterrupt is raised.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


class Interrupted(Exception):
    """Raised at a safe point where there is nothing to save; main() prints it and exits with `code`."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class Interrupt:
    """interrupt = Interrupt().install(); ... if interrupt.requested: ...; interrupt.restore()."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None  # the first signal received
        self.announce = True  # only rank 0 speaks in a data-parallel run
        self._previous = {}

    def install(self) -> "Interrupt":
        """Take over SIGINT and SIGTERM (possible from the main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        self._previous = {sig: signal.signal(sig, _ignore) for sig in self.SIGNALS}
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="signal-watcher", daemon=True)
        self._watcher.start()
        return self

    def restore(self) -> None:
        if not self._previous:
            return
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        os.write(self._write_fd, b"\0")  # wakes the watcher, which then ends
        self._watcher.join()
        os.close(self._read_fd)
        os.close(self._write_fd)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def stop_here(self, what: str) -> None:
        """At a safe point with nothing to save: raise Interrupted when a stop was asked."""
        if self.requested:
            raise Interrupted(f"interrupted ({self.name}) {what}", self.exit_code)

    def _watch(self) -> None:
        while True:
            data = os.read(self._read_fd, 64)
            for signum in data:
                if signum == 0:
                    return
                if signum in self.SIGNALS:
                    self._received(signum)

    def _received(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            _say(f"train.py: second {name}: quitting at once\n")
            os._exit(128 + signum)
        self.signum = signum
        if self.announce:
            _say(f"train.py: {name} received: stopping at the next safe point with a checkpoint of the last "
                 f"completed step ({name} again quits at once)\n")


def _ignore(signum, frame) -> None:
    """The Python-level handler: nothing to do here, the watcher thread acts (see the module's notes)."""


def _say(text: str) -> None:
    # Straight to the file descriptor, after what the streams hold: the main thread may be mid-print.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, RuntimeError):
            pass
    os.write(2, text.encode())
