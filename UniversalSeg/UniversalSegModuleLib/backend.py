"""The module's side of the `universalseg` command line: arguments, --progress-json lines, results.

Protocol (every backend command run with --progress-json): stdout carries one JSON object per
line, `{"progress": 0.42, "message": "..."}` (training also prints `{"loss": 0.81, "step": 12}`), and
finally `{"done": true, "outputs": {...}}` (`extend`: `{"done": true, "model": ..., "report": {...}}`;
on failure `{"done": false, "error": "..."}`). A user error exits with code 2 and one line on stderr.
Other output lines are log text.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from UniversalSegModuleLib.process import STDERR, ProcessRunner, RunningProcess

BACKEND_MODULE = "UniversalSegLib"
DEVICES = ("auto", "cuda", "cpu")
DEFAULT_FORMATS = ("seg.nrrd", "stats")
# For statistics files without the backend's `low_confidence` flag: the backend's threshold
# (UniversalSegLib/io/stats.py, which this process cannot import). Mean probability inside a mask
# is at least the 0.5 threshold by construction, so "low" starts high.
LOW_CONFIDENCE = 0.9


class BackendError(RuntimeError):
    """The backend failed; the message is the backend's own one-line error when it gave one."""


class JobCancelled(BackendError):
    """The user cancelled the job."""


def backend_command(python: str, *args: str) -> list[str]:
    """`python -m UniversalSegLib ARGS`: the backend CLI run by Slicer's own Python."""
    return [python, "-m", BACKEND_MODULE, *args]


def predict_args(input_path: str | Path, output_dir: str | Path, model: str | None = None,
                 classes: str | Sequence[str] | None = None, device: str = "auto", fast: bool = False,
                 formats: Iterable[str] = DEFAULT_FORMATS) -> list[str]:
    """Arguments of `universalseg predict` as the module runs it (always with --progress-json)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
    args = ["predict", str(input_path), "-o", str(output_dir)]
    if model:
        args += ["--model", str(model)]
    if isinstance(classes, str):
        classes = [classes]  # one name, not its letters
    if classes:
        args += ["--classes", *classes]
    args += ["--device", device]
    if fast:
        args.append("--fast")
    return [*args, "--formats", ",".join(formats), "--progress-json"]


# The licence of the published checkpoints (UniversalSegLib/importers/clip_driven_universal.py LICENSE,
# which this process cannot import); shown before an import.
PUBLISHED_CHECKPOINT_LICENSE = "CC BY-NC-ND 4.0 (non-commercial; not redistributable)"


def guess_backbone(path: str | Path) -> str | None:
    """The backbone a published checkpoint's file name suggests (clip_driven_universal_swin_unetr.pth)."""
    name = re.sub(r"[^a-z]", "", Path(path).name.lower())
    if "swin" in name:
        return "swinunetr"
    if "unet" in name:
        return "unet"
    return None


def import_checkpoint_args(path: str | Path, backbone: str, name: str,
                           source_format: str = "clip-driven-universal") -> list[str]:
    """Arguments of `universalseg import-checkpoint` (the published Universal Model checkpoints)."""
    if backbone not in ("unet", "swinunetr"):
        raise ValueError(f"backbone must be unet or swinunetr, not {backbone!r}")
    return ["import-checkpoint", str(path), "--format", source_format, "--backbone", backbone, "-o", name]


@dataclass
class ProgressEvent:
    """One machine-readable progress line."""

    fraction: float | None
    message: str
    data: dict[str, Any] = field(default_factory=dict)


def parse_json_line(line: str) -> dict[str, Any] | None:
    """The JSON object on a line, or None when the line is plain log text."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _error_text(line: str) -> str:
    """The backend's error line without the program prefix."""
    for prefix in ("universalseg: error: ", "error: "):
        if line.startswith(prefix):
            return line[len(prefix):]
    return line


class BackendJob:
    """A backend command running in the background, advanced by calling `step()` (e.g. from a QTimer).

    Callbacks run on the caller's thread. `cleanup` paths are removed when the job fails or is
    cancelled, so a cancelled run leaves nothing behind.
    """

    RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"

    def __init__(self, process: RunningProcess, on_progress: Callable[[ProgressEvent], None] | None = None,
                 on_log: Callable[[str], None] | None = None, cleanup: Iterable[str | Path] = (),
                 expect_result: bool = True):
        self.process = process
        self.expect_result = expect_result
        self.on_progress = on_progress
        self.on_log = on_log
        self.cleanup = [Path(p) for p in cleanup]
        self.state = self.RUNNING
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.stdout_lines: list[str] = []
        self.progress = 0.0
        self._stderr_tail: list[str] = []

    @property
    def finished(self) -> bool:
        return self.state != self.RUNNING

    def _handle(self, stream: str, line: str) -> None:
        if stream == STDERR:
            if line.strip():
                self._stderr_tail = [*self._stderr_tail[-19:], line]
                self._log(line)
            return
        self.stdout_lines.append(line)
        obj = parse_json_line(line)
        if obj is None:
            self._log(line)
        elif obj.get("done"):
            self.result = obj
        elif "error" in obj:
            self.error = str(obj["error"])
        elif {"progress", "message", "loss"} & obj.keys():  # training reports {"loss", "step"} lines
            fraction = obj.get("progress")
            fraction = float(fraction) if isinstance(fraction, (int, float)) and math.isfinite(fraction) else None
            if fraction is not None:
                self.progress = min(max(fraction, 0.0), 1.0)
            event = ProgressEvent(fraction, str(obj.get("message", "")), obj)
            if self.on_progress:
                self.on_progress(event)
            elif event.message:
                self._log(event.message)
        else:
            self._log(line)

    def _log(self, text: str) -> None:
        if self.on_log:
            self.on_log(text)

    def _drain(self) -> None:
        for stream, line in self.process.read_available():
            self._handle(stream, line)

    def step(self) -> bool:
        """Handle the output received so far; True once the job has finished (in any state)."""
        if self.finished:
            return True
        self._drain()
        code = self.process.poll()
        if code is None:
            return False
        self._drain()
        if code == 0 and (self.result is not None or not self.expect_result):
            self.state = self.DONE
            return True
        if code == 0:
            self.error = self.error or "the backend ended without reporting a result"
        else:
            last = self._stderr_tail[-1] if self._stderr_tail else ""
            self.error = self.error or (_error_text(last) if last else f"the backend exited with code {code}")
        self.state = self.FAILED
        self._remove_cleanup()
        return True

    def cancel(self) -> None:
        """Kill the process tree and remove this job's files."""
        if self.finished and self.state != self.DONE:
            return
        self.process.kill_tree()
        self.state = self.CANCELLED
        self.error = "cancelled"
        self._remove_cleanup()

    def _remove_cleanup(self) -> None:
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)

    def wait(self, poll_interval: float = 0.1, idle: Callable[[], None] | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        """Block until the job ends (calling `idle`, e.g. processEvents, in between); the done line."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.step():
            if idle:
                idle()
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise BackendError(f"the backend did not finish within {timeout:g} s")
            time.sleep(poll_interval)
        return self.outputs_or_raise()

    def outputs_or_raise(self) -> dict[str, Any]:
        if self.state == self.CANCELLED:
            raise JobCancelled("cancelled")
        if self.state != self.DONE:
            raise BackendError(self.error or "the backend failed")
        return self.result or {}


def output_path(result: Mapping[str, Any], name: str) -> Path:
    """The file the done line names for output `name` (e.g. "seg.nrrd", "stats", "model")."""
    outputs = result.get("outputs") or {}
    value = outputs.get(name, result.get(name))
    if not value:
        raise BackendError(f"the backend reported no {name!r} output (got: {', '.join(outputs) or 'none'})")
    path = Path(value)
    if not path.exists():
        raise BackendError(f"the backend's {name!r} output {path} does not exist")
    return path


def statistics_output(result: Mapping[str, Any]) -> Path | None:
    """The statistics.json a predict run reported (as "stats", or "stats:json" beside a CSV), if any."""
    outputs = result.get("outputs") or {}
    for key in ("stats:json", "stats.json", "stats"):
        value = outputs.get(key)
        if value and str(value).lower().endswith(".json"):
            return output_path(result, key)
    return None


def run_json(runner: ProcessRunner, command: Sequence[str], env: Mapping[str, str] | None = None,
             timeout: float = 300.0, idle: Callable[[], None] | None = None) -> Any:
    """Run a short command to completion and parse its whole stdout as one JSON document."""
    job = BackendJob(runner.start(command, env=env), expect_result=False)
    deadline = time.monotonic() + timeout
    while not job.step():
        if idle:
            idle()
        if time.monotonic() > deadline:
            job.cancel()
            raise BackendError(f"`{' '.join(command[2:4])}` did not finish within {timeout:g} s")
        time.sleep(0.05)
    if job.state != job.DONE:
        raise BackendError(job.error or "the backend failed")
    text = "\n".join(job.stdout_lines)
    try:
        return json.loads(text)
    except ValueError:
        raise BackendError(f"unexpected output from `{' '.join(command[2:4])}`: {text[:200]!r}") from None


@dataclass
class SegmentStatistics:
    """One row of statistics.json, with the reasons to warn the user about it."""

    key: str
    name: str
    group: str = "other"
    voxel_count: int = 0
    volume_ml: float = 0.0
    mean_hu: float | None = None
    std_hu: float | None = None
    mean_confidence: float | None = None
    low_confidence: bool | None = None  # the backend's flag (io/stats.py); older files lack it
    touches_border: bool = False
    empty: bool = False
    reason: str = ""  # the plausibility check's (io/stats.py); older files lack it

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SegmentStatistics:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def warnings(self, low_confidence: float = LOW_CONFIDENCE) -> list[str]:
        if self.empty or self.voxel_count == 0:
            return ["not found in this scan"] + ([self.reason] if self.reason else [])
        found = [self.reason] if self.reason else []
        flagged = self.low_confidence if self.low_confidence is not None else (
            self.mean_confidence is not None and self.mean_confidence < low_confidence)
        if flagged and self.mean_confidence is not None:
            found.append(f"low confidence ({self.mean_confidence:.2f})")
        if self.touches_border:
            found.append("touches the scan border (may be cut off)")
        return found


def load_statistics(path: str | Path) -> list[SegmentStatistics]:
    """Read the backend's statistics.json (a list of per-class rows)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict):  # tolerate {"classes": [...]}
        data = data.get("classes", [])
    return [SegmentStatistics.from_dict(row) for row in data]
