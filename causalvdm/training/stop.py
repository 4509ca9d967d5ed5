"""Stopping a run between steps: SIGTERM (pre-emption) and Ctrl-C both ask for a checkpoint, then an exit."""

import logging
import signal
import time

log = logging.getLogger("causalvdm.train")

EXIT_CODES = {"SIGTERM": 0, "SIGINT": 130}  # 130: the shell's code for a run stopped by Ctrl-C
# A second Ctrl-C this long after the first is a person insisting; sooner it is the same one delivered twice (under
# torchrun the terminal's and the one torchrun forwards to its workers).
INSIST_AFTER_S = 1.0


class StopRequest:
    """Installs SIGTERM and SIGINT handlers that record the first signal; the loop checks `requested` after each
    step, saves a checkpoint and returns `exit_code`. A second Ctrl-C stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signal: str | None = None
        self._since = 0.0

    def install(self) -> None:
        """Take over SIGTERM and SIGINT for this process (call from the main thread)."""
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, 0)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal == "SIGINT" and time.monotonic() - self._since > INSIST_AFTER_S:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal, self._since = name, time.monotonic()
            if name == "SIGINT":
                log.warning("Ctrl-C: saving a checkpoint after this step, then exiting (Ctrl-C again: exit without it)")
