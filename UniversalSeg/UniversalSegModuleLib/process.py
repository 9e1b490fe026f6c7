"""Background processes: start without blocking, read output lines as they come, kill the whole tree.

The module never runs torch inside Slicer: it starts the backend as a child process of Slicer's
Python. `ProcessRunner` is the seam that tests replace with a fake. Output is read by two daemon
threads into a queue, so the GUI thread only ever drains the queue (from a QTimer) and never blocks.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Protocol

STDOUT = "stdout"
STDERR = "stderr"


class RunningProcess(Protocol):
    """A started process whose output is collected in the background."""

    def read_available(self) -> list[tuple[str, str]]:
        """The output lines received since the last call, as (STDOUT|STDERR, line); never blocks."""
        ...

    def poll(self) -> int | None:
        """The exit code once the process has ended and all its output has been read, else None."""
        ...

    def kill_tree(self) -> None:
        """Kill the process and every process it started; returns once they are gone."""
        ...


class ProcessRunner(Protocol):
    """Starts processes; the module's only way of running the backend."""

    def start(self, args: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: str | None = None) -> RunningProcess:
        ...


class PopenProcess:
    """A `subprocess.Popen` with reader threads for stdout and stderr."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self._lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self._readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                         for stream, name in ((popen.stdout, STDOUT), (popen.stderr, STDERR))]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self, stream, name: str) -> None:
        for line in iter(stream.readline, ""):
            self._lines.put((name, line.rstrip("\r\n")))
        stream.close()

    def read_available(self) -> list[tuple[str, str]]:
        lines = []
        while True:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                return lines

    def poll(self) -> int | None:
        code = self.popen.poll()
        if code is None or any(r.is_alive() for r in self._readers):
            return None
        return None if not self._lines.empty() else code

    def kill_tree(self) -> None:
        kill_process_tree(self.popen.pid)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)
        for reader in self._readers:
            reader.join(timeout=5)


def kill_process_tree(pid: int, grace: float = 5.0) -> None:
    """End `pid` and all its descendants (a launcher such as PythonSlicer starts the real Python as a
    child, so ending only `pid` would leave the computation running). Each process first gets SIGTERM,
    which lets the backend remove its temporary files, and is killed if still there after `grace` s."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(pid)
            family = [*parent.children(recursive=True), parent]
        except psutil.NoSuchProcess:
            return
        for signal_name in ("terminate", "kill"):
            for proc in family:
                try:
                    getattr(proc, signal_name)()
                except psutil.NoSuchProcess:
                    pass
            _gone, family = psutil.wait_procs(family, timeout=grace if signal_name == "terminate" else 10)
            if not family:
                return
        return
    if sys.platform == "win32":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, check=False)
    else:  # started in its own session, so the process group is the whole tree
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class SubprocessRunner:
    """Runs real processes: hidden console on Windows, own process group elsewhere, UTF-8 text."""

    def start(self, args: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: str | None = None) -> PopenProcess:
        kwargs: dict = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)
        else:
            kwargs["start_new_session"] = True
        popen = subprocess.Popen(list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
                                 bufsize=1, env=dict(env) if env is not None else None, cwd=cwd, **kwargs)
        return PopenProcess(popen)
