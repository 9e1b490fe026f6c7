"""Progress reporting and cancellation for long extension runs (the Slicer wizard drives both)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Union

from UniversalSegLib.errors import UniversalSegError
from UniversalSegLib.progress import ProgressFn, within

StepFn = Callable[[int, float], None]
Cancel = Union[threading.Event, Callable[[], bool], None]


class ExtensionCancelled(UniversalSegError):
    """The caller cancelled the extension; nothing was written."""

    def __init__(self, message: str = "extension cancelled; no model was written"):
        super().__init__(message)


def cancel_checker(cancel: Cancel) -> Callable[[], bool]:
    """A no-argument predicate for an Event, a callable or None."""
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise TypeError("cancel must be a threading.Event, a callable returning bool, or None")


class Reporter:
    """Maps the work of each stage onto one overall 0..1 progress and checks for cancellation."""

    def __init__(self, progress: ProgressFn | None, on_step: StepFn | None, cancel: Cancel):
        self._progress, self._on_step = progress, on_step
        self.cancelled = cancel_checker(cancel)
        self._stage = progress

    def stage(self, lo: float, hi: float) -> None:
        """Subsequent `update(fraction)` calls map into [lo, hi] of the whole run."""
        self._stage = within(self._progress, lo, hi) if self._progress is not None else None

    def update(self, fraction: float, message: str) -> None:
        self.check()
        if self._stage is not None:
            self._stage(fraction, message)

    def step(self, step: int, loss: float) -> None:
        if self._on_step is not None:
            self._on_step(step, loss)

    def check(self) -> None:
        """Raise ExtensionCancelled if the caller asked to stop."""
        if self.cancelled():
            raise ExtensionCancelled()
