"""Keep ITK's own log lines (its output window, MetaIO's and NIfTI-lib's prints) away from the user.

ITK writes warnings and some errors straight to the process's stdout and stderr from C++
(SimpleITK offers no Python hook for its output window), where they would break the one-line
errors of the CLI and the JSON progress channel on stdout that the Slicer module reads. So the
file descriptors themselves are redirected to a temporary file while ITK runs, and what ITK wrote
becomes one `ITKWarning` per message, or the detail of our error when the call failed.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from UniversalSegLib.errors import UniversalSegWarning

# "WARNING: In /path/itkFoo.cxx, line 12" and "ImageSeriesReader (0x55d...): " carry nothing for a user.
_SOURCE_LINE = re.compile(r"^\s*(WARNING|ERROR): In .*, line \d+\s*$")
_OBJECT_PREFIX = re.compile(r"^\s*\w+ \(0x[0-9a-fA-F]+\):\s*")
# The descriptors are process-wide: two threads redirecting them at once could leave fd 2 pointing at a
# temporary file for good. Captures are serialised (re-entrant: they nest within a thread).
_FD_LOCK = threading.RLock()


class ITKWarning(UniversalSegWarning):
    """A warning ITK printed while reading or writing an image, as one line."""


@dataclass
class ITKLog:
    """What ITK printed inside `capture_itk_output()`, as one line per message."""

    messages: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "; ".join(self.messages)


def condense(raw: str) -> list[str]:
    """ITK's printed text as one line per message: blank lines separate messages, source locations dropped."""
    messages = []
    for block in re.split(r"\n\s*\n", raw):
        lines = [_OBJECT_PREFIX.sub("", line).strip() for line in block.splitlines()
                 if line.strip() and not _SOURCE_LINE.match(line)]
        if lines:
            messages.append(" ".join(lines))
    return messages


def _flush_c_stdio() -> None:
    """Flush C's stdio buffers (C++ iostreams share them by default): text ITK printed to a piped stdout
    may still sit there and would otherwise come out after the descriptors are restored."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):
        pass  # no C library handle (Windows): its CRT writes unbuffered to pipes opened this way


def _has_standard_fds() -> bool:
    try:
        os.fstat(1)
        os.fstat(2)
    except OSError:
        return False
    return True


@contextmanager
def capture_itk_output(warn: bool = True) -> Iterator[ITKLog]:
    """Redirect fds 1 and 2 to a temporary file while the block runs; the yielded log holds what was written.

    When the block returns normally and `warn` is set, each message becomes an `ITKWarning`; when it
    raises, nothing is warned and the caller may put `log.text` into its error. Python warnings raised
    inside the block are held back and re-issued after the descriptors are restored (printed inside,
    they would be swallowed), so captures nest.
    """
    log = ITKLog()
    if not _has_standard_fds():
        yield log  # e.g. a Windows GUI process without a console: ITK's prints go nowhere anyway
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    with _FD_LOCK, tempfile.TemporaryFile() as sink, warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")  # record everything; the caller's filters apply when re-issued
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        try:
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            yield log
        finally:
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:
                    stream.flush()
            _flush_c_stdio()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            log.messages = condense(sink.read().decode("utf-8", errors="replace"))
    for w in held:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if warn:
        for message in log.messages:
            warnings.warn(f"ITK: {message}", ITKWarning, stacklevel=3)


@contextmanager
def python_output_apart() -> Iterator[None]:
    """While the block runs, sys.stdout and sys.stderr write to copies of fds 1 and 2, not to 1 and 2.

    A capture redirects the process's fds 1 and 2, so while one thread reads an image (the cohort's
    reading thread) another thread's Python output (progress, JSON lines, a refused case's line) went
    into the capture and came back as a bogus ITKWarning, or not at all. With Python's own streams on
    copies of the fds, a capture only catches what C/C++ code writes to 1 and 2. Streams that are no
    fd 1 or 2 (a test's in-memory capture, an IDE console) are left alone.
    """
    swapped = {}
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        try:
            if stream is None or stream.fileno() != fd:
                continue
        except (AttributeError, OSError, ValueError):  # no real file behind it
            continue
        stream.flush()
        line_buffered = name == "stderr" or getattr(stream, "line_buffering", False)
        copy = open(os.dup(fd), "w", buffering=1 if line_buffered else -1,  # noqa: SIM115 - closed below
                    encoding=stream.encoding, errors=stream.errors)
        swapped[name] = (stream, copy)
        setattr(sys, name, copy)
    try:
        yield
    finally:
        for name, (original, copy) in swapped.items():
            copy.flush()
            setattr(sys, name, original)
            copy.close()

