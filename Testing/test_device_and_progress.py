"""The one device rule (device.py) and the one progress module (progress.py)."""

from __future__ import annotations

import json

import pytest
import torch

from UniversalSegLib.device import resolve_device
from UniversalSegLib.errors import InputError
from UniversalSegLib.progress import CountBar, Monotonic, json_progress, stage_lines, within
from UniversalSegLib.train.distributed import DistInfo


def test_auto_picks_cuda_only_when_there_is_one():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == resolve_device(None).type == expected
    assert resolve_device("cpu", DistInfo()) == torch.device("cpu")


@pytest.mark.parametrize("name,message", [
    ("gpu0", "unknown device 'gpu0'; use auto, cpu, cuda or cuda:N"),
    ("cuda:x", "unknown device 'cuda:x'; use auto, cpu, cuda or cuda:N"),
])
def test_unknown_device_is_a_user_error(name, message):
    with pytest.raises(InputError) as info:
        resolve_device(name)
    assert str(info.value) == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_cuda_is_a_user_error():
    with pytest.raises(InputError, match="no CUDA GPU is available; use --device cpu or auto"):
        resolve_device("cuda:0", DistInfo(rank=1, local_rank=1, world_size=2))


def test_monotonic_progress_never_goes_back_and_stages_map_into_their_share():
    seen = []
    report = Monotonic(lambda f, m: seen.append((round(f, 3), m)))
    report(0.2, "a")
    report(0.1, "late")  # an earlier fraction arriving late keeps the bar where it was
    stage = report.span(0.5, 0.9)
    stage(0.5, "half")
    stage(2.0, "over")  # clamped to the stage's end
    assert seen == [(0.2, "a"), (0.2, "late"), (0.7, "half"), (0.9, "over")]
    got = []
    within(lambda f, m: got.append(f), 0.0, 0.5)(-1.0, "x")
    assert got == [0.0]


def test_json_progress_is_the_protocol_the_slicer_module_reads(capsys):
    json_progress(0.123456, "sliding window", cases_done=1)
    line = capsys.readouterr().out
    assert line.endswith("\n") and json.loads(line) == {"progress": 0.1235, "message": "sliding window",
                                                        "cases_done": 1}


def test_stage_lines_print_once_per_stage(capsys):
    show = stage_lines()
    for fraction, message in [(0.1, "training: step 1"), (0.2, "training: step 2"), (0.9, "evaluating")]:
        show(fraction, message)
    assert capsys.readouterr().err.splitlines() == ["[10.0%] training: step 1", "[90.0%] evaluating"]


def test_count_bar_closes_itself_at_the_total(capsys):
    bar = CountBar("preprocessing training cases")
    bar(1, 2, "case_a")
    assert bar.bar is not None and bar.bar.n == 1
    bar(2, 2, "case_b")
    assert bar.bar is None
    assert "preprocessing training cases" in capsys.readouterr().err


def test_json_lines_from_several_threads_stay_one_object_per_line(monkeypatch):
    """A cohort reads the next case in a thread while the current one reports: print() writes a line's
    text and its newline separately, so two threads could glue two objects into one unreadable line."""
    import io
    import threading
    import time

    class SlowStdout(io.StringIO):  # a pause in every write lets another thread in, as a busy pipe does
        def write(self, text):
            time.sleep(0.001)
            return super().write(text)

    out = SlowStdout()
    monkeypatch.setattr("sys.stdout", out)
    threads = [threading.Thread(target=lambda i=i: [json_progress(0.5, f"thread {i} line {n}") for n in range(20)])
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = out.getvalue().splitlines()
    assert len(lines) == 80 and all(json.loads(line)["progress"] == 0.5 for line in lines)
