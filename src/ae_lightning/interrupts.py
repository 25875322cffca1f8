"""SIGTERM anywhere in a run: noticed inside Lightning's loops, raised at once outside them.

Lightning turns SIGTERM into ``SIGTERMException`` only inside ``fit``/``test``: its
``_SignalConnector`` installs a handler when a loop starts, which also calls the handler it
found (this one), and restores that handler at teardown. Before and after its loops (data
loading, the latent metrics, the records) nothing would stop the run, and a SIGTERM that
arrives after a loop's last check (the final figures) would be lost. ``SigtermGuard`` covers
the whole run: while Lightning's handler is installed it only notes the signal; otherwise it
raises ``Terminated`` where the program is.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

INTERRUPTED = "interrupted.json"  # a run stopped by SIGTERM: resume= continues it


class Terminated(BaseException):
    """SIGTERM outside Lightning's loops. A BaseException: no ``except Exception`` eats it."""


class SigtermGuard:
    """``with SigtermGuard() as guard:`` ... ``guard.received`` says whether SIGTERM came."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> SigtermGuard:
        if threading.current_thread() is threading.main_thread():  # signals reach it alone
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = True
        if signal.getsignal(signal.SIGTERM) == self._handle:  # no Lightning loop listens now
            raise Terminated
