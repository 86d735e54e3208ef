"""Ending a run on a signal: the flag the loop polls and the error that reports where it stopped."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from lhtcli.errors import LHTError


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits 130/143."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(LHTError):
    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        where = f"; checkpoint saved to {checkpoint}" if checkpoint else ""
        super().__init__(f"training interrupted by {signal.Signals(signum).name}{where} (resume with --resume auto)")
        self.exit_code = 128 + signum
