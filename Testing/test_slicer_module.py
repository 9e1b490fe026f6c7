"""The 3D Slicer module (UniversalSeg/) without Slicer.

Plain helpers (UniversalSeg/UniversalSegModuleLib) are tested in this process. Everything that imports
`slicer`, `qt`, `ctk` or `vtk` runs in a fresh subprocess against the stand-in in Testing/slicer_stub/
(see its README: exactly the Slicer calls the module makes), one subprocess per test, so the fakes never
reach other tests' sys.modules. The scenario functions `_scenario_*` at the end of this file are what
those subprocesses run. The backend is faked by `FakeRunner` (scripted --progress-json output) except
in `test_real_backend_predict`, which runs the real `universalseg predict` on the bundled sample CT.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from UniversalSegModuleLib import backend, classes, dependencies, process, wizard  # on pytest's pythonpath

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "UniversalSeg"
STUB_DIR = REPO / "Testing" / "slicer_stub"
SAMPLE_CT = REPO / "UniversalSegLib" / "resources" / "sample" / "ct_abdomen.nii.gz"

# --------------------------------------------------------------------------------------------------
# Fakes of the module's own seams (ProcessRunner, DependencyInstaller); plain Python, used here and in
# the subprocess scenarios.
# --------------------------------------------------------------------------------------------------


class FakeProcess:
    """A scripted RunningProcess: each read_available() returns the next batch of (stream, line);
    a batch may be a callable (run at that moment, e.g. to write output files) returning the lines."""

    def __init__(self, batches=(), returncode: int = 0, hang: bool = False):
        self.batches = list(batches)
        self.returncode = returncode
        self.hang = hang
        self.killed = False

    def read_available(self):
        if self.killed or not self.batches:
            return []
        batch = self.batches.pop(0)
        return list(batch() if callable(batch) else batch)

    def poll(self):
        if self.killed:
            return -9
        if self.batches or self.hang:
            return None
        return self.returncode

    def kill_tree(self):
        self.killed = True


class FakeRunner:
    """Dispatches on the backend sub-command (`python -m UniversalSegLib <sub> ...`); records every call."""

    def __init__(self, handlers):
        self.handlers = handlers
        self.commands: list[list[str]] = []
        self.envs: list[dict] = []

    def start(self, args, env=None, cwd=None):
        args = list(args)
        assert args[1:3] == ["-m", "UniversalSegLib"], args
        self.commands.append(args)
        self.envs.append(dict(env or {}))
        return self.handlers[args[3]](args, env)


class FakeInstaller:
    def __init__(self, torch: str | None = "2.13.0", backend_version: str | None = "0.1.0", answer: bool = True):
        self.torch = torch
        self.backend = backend_version
        self.answer = answer
        self.calls: list = []

    def torch_version(self):
        return self.torch

    def install_torch(self, requirement):
        self.calls.append(("torch", requirement))
        self.torch = "2.13.0"
        return True

    def backend_version(self):
        return self.backend

    def install_backend(self, source_dir, upgrade):
        self.calls.append(("backend", Path(source_dir), upgrade))
        self.backend = dependencies.bundled_backend_version(source_dir)

    def confirm(self, message, details):
        self.calls.append(("confirm", details))
        return self.answer


def json_lines(value) -> list[tuple[str, str]]:
    return [("stdout", line) for line in json.dumps(value, indent=1).splitlines()]


def progress(fraction: float, message: str, **extra) -> tuple[str, str]:
    return ("stdout", json.dumps({"progress": fraction, "message": message, **extra}))


FAKE_MODELS = [{"name": "demo", "version": "0.1.0", "classes": 4, "backbone": "segresnet", "license": "Apache-2.0",
                "path": "/models/demo"}]
FAKE_CLASSES = [
    {"key": "liver", "name": "Liver", "group": "organ", "color": [221, 130, 101], "parents": [], "synonyms": []},
    {"key": "kidney_left", "name": "Left kidney", "group": "organ", "color": [185, 102, 83], "parents": [],
     "synonyms": ["left renal"]},
    {"key": "aorta", "name": "Aorta", "group": "vessel", "color": [224, 97, 76], "parents": [], "synonyms": []},
    {"key": "liver_tumor", "name": "Liver tumor", "group": "tumour", "color": [255, 210, 0], "parents": ["liver"],
     "synonyms": ["hepatic lesion"]},
]


def write_fake_prediction(input_path: str, output_dir: Path, keys: list[str]) -> dict:
    """What `universalseg predict` writes: a layered .seg.nrrd on the input grid (liver_tumor inside
    liver, so they overlap) and statistics.json."""
    import numpy as np
    import SimpleITK as sitk
    import slicerio

    image = sitk.ReadImage(input_path)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    ijk_to_lps[:3, 3] = image.GetOrigin()
    seg = slicerio.create_segmentation(image.GetSize(), ijk_to_lps)
    size = np.array(image.GetSize())
    boxes = {"liver": (size * 0.2, size * 0.6), "liver_tumor": (size * 0.3, size * 0.4),
             "kidney_left": (size * 0.6, size * 0.7), "aorta": (size * 0.45, size * 0.55)}
    rows = []
    for key in keys:
        lo, hi = boxes[key]
        mask = np.zeros(tuple(size), bool)
        mask[int(lo[0]):int(hi[0]), int(lo[1]):int(hi[1]), int(lo[2]):int(hi[2])] = True
        slicerio.add_segment(seg, mask, {"id": key, "name": key.replace("_", " ").title()})
        rows.append({"key": key, "name": key.replace("_", " ").title(), "group": "organ",
                     "voxel_count": int(mask.sum()), "volume_ml": float(mask.sum() * 0.027), "mean_hu": 40.0,
                     "std_hu": 10.0, "mean_confidence": 0.55 if key == "liver_tumor" else 0.93,
                     "touches_border": False, "empty": False})
    output_dir.mkdir(parents=True, exist_ok=True)
    slicerio.write_segmentation(str(output_dir / "segmentation.seg.nrrd"), seg)
    (output_dir / "statistics.json").write_text(json.dumps(rows))
    return {"done": True, "outputs": {"seg.nrrd": str(output_dir / "segmentation.seg.nrrd"),
                                      "stats": str(output_dir / "statistics.json")}}


def predict_handler(args, env):
    out = Path(args[args.index("-o") + 1])
    keys = args[args.index("--classes") + 1:args.index("--device")] if "--classes" in args else \
        [c["key"] for c in FAKE_CLASSES]

    def finish():
        return [("stdout", json.dumps(write_fake_prediction(args[4], out, keys)))]

    return FakeProcess([[progress(0.0, "reading image"), ("stdout", "plain log text")],
                        [("stderr", "a warning on stderr"), progress(0.5, "sliding window")],
                        [progress(1.0, "writing outputs")], finish])


def classes_handler(model_classes: list[dict], registry: list[dict] | None = None):
    """A stand-in `universalseg classes`: the listing (--all: `registry`), or with --new-classes the
    backend's own check of the classes file (UniversalSegLib.continual.classes) against `model_classes`."""
    def handler(args, env):
        if "--new-classes" not in args:
            return FakeProcess([json_lines(registry if "--all" in args and registry is not None else model_classes)])
        from types import SimpleNamespace

        from UniversalSegLib.continual.classes import check_new_classes
        from UniversalSegLib.continual.command import load_classes_file
        from UniversalSegLib.registry import ClassInfo

        manifest = SimpleNamespace(name=args[args.index("--model") + 1], class_keys=[c["key"] for c in model_classes],
                                   classes=[ClassInfo.from_dict(c) for c in model_classes])
        made, problems = check_new_classes(load_classes_file(args[args.index("--new-classes") + 1]), manifest)
        return FakeProcess([json_lines({"classes": [c.to_dict() for c in made], "problems": problems})])
    return handler


def fake_runner(**extra_handlers) -> FakeRunner:
    handlers = {"models": lambda a, e: FakeProcess([json_lines(FAKE_MODELS)]),
                "classes": classes_handler(FAKE_CLASSES),
                "predict": predict_handler}
    handlers.update(extra_handlers)
    return FakeRunner(handlers)


# --------------------------------------------------------------------------------------------------
# Running a scenario in a subprocess against the stand-in
# --------------------------------------------------------------------------------------------------


def stub_pythonpath() -> str:
    """PYTHONPATH of a subprocess that runs the module against the stand-in: the stand-in first
    (its `slicer`, `qt`, `ctk`, `vtk`), then the module, the tests and the repository."""
    paths = [STUB_DIR, MODULE_DIR, REPO / "Testing", REPO]
    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    return os.pathsep.join([*map(str, paths), *inherited])


def run_in_stub(scenario: str, tmp_path: Path, timeout: float = 240, **env) -> str:
    code = f"import test_slicer_module as t; t.{scenario}()"
    full_env = {**os.environ, "PYTHONPATH": stub_pythonpath(), "TEST_TMP": str(tmp_path),
                "SLICER_STUB_TEMP": str(tmp_path / "slicer-temp"), "OMP_NUM_THREADS": "1", **env}
    (tmp_path / "slicer-temp").mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8",
                            env=full_env,
                            cwd=str(tmp_path), timeout=timeout)
    assert result.returncode == 0, f"{scenario} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result.stdout


# --------------------------------------------------------------------------------------------------
# Backend protocol and command lines (in process)
# --------------------------------------------------------------------------------------------------


def test_predict_command_line():
    args = backend.predict_args("/t/in.nrrd", "/t/out", model="demo", classes=["liver", "liver_tumor"],
                                device="cpu", fast=True)
    assert backend.backend_command("py", *args) == [
        "py", "-m", "UniversalSegLib", "predict", "/t/in.nrrd", "-o", "/t/out", "--model", "demo", "--classes",
        "liver", "liver_tumor", "--device", "cpu", "--fast", "--formats", "seg.nrrd,stats", "--progress-json"]
    assert "--classes" not in backend.predict_args("i", "o")  # all of the model's classes
    with pytest.raises(ValueError):
        backend.predict_args("i", "o", device="gpu")
    assert backend.import_checkpoint_args("/x.pth", "unet", "pub") == [
        "import-checkpoint", "/x.pth", "--format", "clip-driven-universal", "--backbone", "unet", "-o", "pub"]


def test_job_follows_progress_log_and_done(tmp_path):
    seg = tmp_path / "s.seg.nrrd"
    seg.write_text("x")
    events, logs = [], []
    proc = FakeProcess([[progress(0.1, "a"), ("stdout", "not json {"), ("stdout", "[1, 2]")],
                        [("stderr", "careful"), ("stdout", '{"progress": NaN}'), progress(0.7, "b")],
                        [("stdout", '{"loss": 0.5, "step": 3}')],
                        [("stdout", json.dumps({"done": True, "outputs": {"seg.nrrd": str(seg)}}))]])
    job = backend.BackendJob(proc, on_progress=events.append, on_log=logs.append)
    steps = 0
    while not job.step():
        steps += 1
    assert steps >= 2 and job.state == job.DONE
    assert [e.fraction for e in events] == [0.1, None, 0.7, None]  # a NaN fraction is no fraction
    assert [e.message for e in events] == ["a", "", "b", ""] and job.progress == 0.7
    assert events[-1].data == {"loss": 0.5, "step": 3}
    assert logs == ["not json {", "[1, 2]", "careful"]
    assert backend.output_path(job.result, "seg.nrrd") == seg
    with pytest.raises(backend.BackendError, match="no 'stats' output"):
        backend.output_path(job.result, "stats")
    assert backend.statistics_output(job.result) is None
    (tmp_path / "statistics.csv").write_text("x")
    (tmp_path / "statistics.json").write_text("[]")
    for outputs in ({"stats": str(tmp_path / "statistics.json")},
                    {"stats": str(tmp_path / "statistics.csv"), "stats:json": str(tmp_path / "statistics.json")}):
        assert backend.statistics_output({"done": True, "outputs": outputs}) == tmp_path / "statistics.json"


def test_job_failure_reports_the_backend_error_and_cleans_up(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    proc = FakeProcess([[progress(0.2, "x"), ("stderr", "universalseg: error: the input image is 2D")]], returncode=2)
    job = backend.BackendJob(proc, cleanup=[work])
    with pytest.raises(backend.BackendError, match="^the input image is 2D$"):
        job.wait(poll_interval=0)
    assert not work.exists()
    refused = backend.BackendJob(FakeProcess([[("stdout", '{"done": false, "error": "no mask for lumen"}'),
                                               ("stderr", "universalseg: error: no mask for lumen")]], returncode=2))
    with pytest.raises(backend.BackendError, match="^no mask for lumen$"):
        refused.wait(poll_interval=0)
    silent = backend.BackendJob(FakeProcess([[progress(0.5, "x")]], returncode=0))
    with pytest.raises(backend.BackendError, match="without reporting a result"):
        silent.wait(poll_interval=0)


def _backend_parser(register_module: str | None = None):
    """The backend's real argument parser (with a sub-command registered by another module if named)."""
    import argparse
    import importlib

    from UniversalSegLib import cli

    parser = cli.build_parser()
    if register_module:
        try:
            register = importlib.import_module(register_module).register_cli
        except ImportError:
            pytest.skip(f"{register_module} is not available yet")
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "extend" not in sub.choices:
            register(sub)
    return parser


def test_command_lines_fit_the_backend_parsers(tmp_path):
    """The arguments the module builds are accepted by the backend's own parsers (where they exist yet)."""
    parser = _backend_parser()
    ns = parser.parse_args(backend.import_checkpoint_args("/x.pth", "swinunetr", "pub"))
    assert (ns.path, ns.backbone, ns.name) == ("/x.pth", "swinunetr", "pub")
    parser = _backend_parser("UniversalSegLib.continual.command")
    new = [wizard.NewClass("aorta_true_lumen", "Aorta true lumen", group="vessel", parents=["aorta"]),
           wizard.NewClass("gland", "Gland", "a small gland", "organ", ["aorta_true_lumen"], (1, 2, 3), ["glandula"],
                           trunk=False)]
    settings = wizard.TrainingSettings("demo", "demo-plus", epochs=3, time_budget_minutes=2, train="heads")
    classes_file = wizard.write_classes_file(new, tmp_path / "job" / "classes.json")
    ns = parser.parse_args(wizard.extend_args(settings, tmp_path, classes_file, tmp_path / "out"))
    assert ns.classes_file == str(classes_file) and ns.new_class is None and ns.group is None
    assert (ns.train, ns.epochs, ns.time_budget, ns.progress_json) == ("heads", 3, 120, True)
    # ... and the backend turns the file into the classes the wizard asked for, each with its own fields
    from types import SimpleNamespace

    from UniversalSegLib.continual.classes import make_new_classes
    from UniversalSegLib.continual.command import new_class_specs
    from UniversalSegLib.registry import default_registry

    made = make_new_classes(new_class_specs(ns), SimpleNamespace(class_keys=["aorta"], name="demo",
                                                                 classes=[default_registry()["aorta"]]))
    assert [(c.key, c.name, c.prompt, c.group, c.parents, c.color, c.synonyms, c.location) for c in made] == [
        ("aorta_true_lumen", "Aorta true lumen", "aorta true lumen", "vessel", ["aorta"], [230, 160, 40], [],
         {"trunk": True}),
        ("gland", "Gland", "a small gland", "organ", ["aorta_true_lumen"], [1, 2, 3], ["glandula"], {"trunk": False})]


def test_statistics_warnings(tmp_path):
    path = tmp_path / "statistics.json"
    path.write_text(json.dumps([
        {"key": "liver", "name": "Liver", "voxel_count": 10, "volume_ml": 1.5, "mean_confidence": 0.95},
        {"key": "pancreas", "name": "Pancreas", "voxel_count": 10, "mean_confidence": 0.6, "touches_border": True},
        {"key": "spleen", "name": "Spleen", "voxel_count": 0, "empty": True, "extra_field": 1}]))
    rows = backend.load_statistics(path)
    assert [r.warnings() for r in rows] == [
        [], ["low confidence (0.60)", "touches the scan border (may be cut off)"], ["not found in this scan"]]


def test_statistics_warnings_show_the_plausibility_reason(tmp_path):
    path = tmp_path / "statistics.json"
    path.write_text(json.dumps({"classes": [
        {"key": "kidney_right", "name": "Right kidney", "voxel_count": 10, "mean_confidence": 0.49,
         "low_confidence": True, "reason": "implausible position: lies 0.43 trunk half-widths left of the midline"},
        {"key": "aorta", "name": "Aorta", "voxel_count": 0, "empty": True,
         "reason": "removed 36.0 ml outside the trunk (in an arm or limb)"}]}))
    assert [r.warnings() for r in backend.load_statistics(path)] == [
        ["implausible position: lies 0.43 trunk half-widths left of the midline", "low confidence (0.49)"],
        ["not found in this scan", "removed 36.0 ml outside the trunk (in an arm or limb)"]]


def test_statistics_warnings_follow_the_backends_flag(tmp_path):
    from UniversalSegLib.io.stats import LOW_CONFIDENCE

    assert backend.LOW_CONFIDENCE == LOW_CONFIDENCE  # same rule for files written without the flag
    path = tmp_path / "statistics.json"
    path.write_text(json.dumps({"classes": [
        {"key": "liver", "name": "Liver", "voxel_count": 10, "mean_confidence": 0.97, "low_confidence": True},
        {"key": "spleen", "name": "Spleen", "voxel_count": 10, "mean_confidence": 0.5, "low_confidence": False},
        {"key": "heart", "name": "Heart", "voxel_count": 10, "mean_confidence": LOW_CONFIDENCE - 0.01}]}))
    assert [r.warnings() for r in backend.load_statistics(path)] == [
        ["low confidence (0.97)"], [], [f"low confidence ({LOW_CONFIDENCE - 0.01:.2f})"]]


def _spawning_script(marker: Path) -> str:
    """A parent that starts a child, prints both pids, writes a file and sleeps (a stand-in backend)."""
    return textwrap.dedent(f"""
        import subprocess, sys, time, json
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(json.dumps({{"progress": 0.1, "message": "started", "pids": [child.pid]}}), flush=True)
        open({str(marker)!r}, "w").write("partial")
        time.sleep(60)
    """)


def test_subprocess_runner_cancel_kills_the_whole_tree(tmp_path):
    import psutil

    proc = process.SubprocessRunner().start([sys.executable, "-c", _spawning_script(tmp_path / "partial")])
    job = backend.BackendJob(proc, cleanup=[tmp_path / "partial"])
    events = []
    job.on_progress = events.append
    deadline = time.monotonic() + 30
    while not events and time.monotonic() < deadline:
        job.step()
        time.sleep(0.02)
    child = psutil.Process(events[0].data["pids"][0])
    parent = psutil.Process(proc.pid)
    job.cancel()
    for p in (parent, child):
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    assert job.state == job.CANCELLED and proc.poll() is not None


def test_subprocess_runner_keeps_lines_and_exit_code():
    script = "import sys\nfor i in range(300): print(i)\nprint('bad', file=sys.stderr)\nsys.exit(3)"
    proc = process.SubprocessRunner().start([sys.executable, "-c", script])
    lines = []
    while (code := proc.poll()) is None:
        lines += proc.read_available()
        time.sleep(0.01)
    lines += proc.read_available()
    assert code == 3
    assert [text for stream, text in lines if stream == "stdout"] == [str(i) for i in range(300)]
    assert ("stderr", "bad") in lines


# --------------------------------------------------------------------------------------------------
# Dependencies (in process)
# --------------------------------------------------------------------------------------------------


def test_bundled_backend_found_with_its_version():
    import UniversalSegLib

    source = dependencies.bundled_backend_dir(MODULE_DIR)
    assert source == REPO
    assert dependencies.bundled_backend_version(source) == UniversalSegLib.__version__
    requirements = dependencies.read_backend_requirements(source)
    assert any(r.startswith("monai") for r in requirements) and any(r.startswith("torch") for r in requirements)
    kept = dependencies.without_skipped(requirements)
    assert {dependencies.requirement_name(r) for r in kept}.isdisjoint({"torch", "numpy", "simpleitk", "requests"})
    assert len(kept) == len(requirements) - 3  # torch, numpy, SimpleITK are backend requirements


def test_requirements_reader_without_tomllib(monkeypatch):
    with_tomllib = dependencies.read_backend_requirements(REPO)
    monkeypatch.setitem(sys.modules, "tomllib", None)  # Python 3.10 has no tomllib
    assert dependencies.read_backend_requirements(REPO) == with_tomllib


def test_first_run_installs_after_consent():
    installer = FakeInstaller(torch=None, backend_version=None)
    plan = dependencies.ensure_dependencies(installer, REPO)
    assert plan.install_torch and plan.install_backend and not plan.upgrade_backend
    kinds = [c[0] for c in installer.calls]
    assert kinds == ["confirm", "torch", "backend"]
    assert "PyTorch" in installer.calls[0][1] and "kept" in installer.calls[0][1]
    assert installer.calls[1] == ("torch", dependencies.backend_torch_requirement(REPO))  # ">=2.13"
    # Now everything is there: nothing is asked or installed again.
    installer.calls.clear()
    assert not dependencies.ensure_dependencies(installer, REPO).needed and installer.calls == []


def test_declined_installation_installs_nothing():
    installer = FakeInstaller(torch=None, backend_version=None, answer=False)
    with pytest.raises(dependencies.DependencyError, match="declined"):
        dependencies.ensure_dependencies(installer, REPO)
    assert [c[0] for c in installer.calls] == ["confirm"]


def test_stale_backend_is_updated_and_newer_one_kept():
    stale = FakeInstaller(backend_version="0.0.9")
    plan = dependencies.ensure_dependencies(stale, REPO)
    assert plan.upgrade_backend and stale.calls[-1] == ("backend", REPO, True)
    assert "update 0.0.9 ->" in stale.calls[0][1]
    newer = FakeInstaller(backend_version="99.0")
    assert not dependencies.ensure_dependencies(newer, REPO).needed and newer.calls == []
    old_torch = FakeInstaller(torch="1.13.1+cu117")
    with pytest.raises(dependencies.DependencyError, match="too old"):
        dependencies.ensure_dependencies(old_torch, REPO)


# --------------------------------------------------------------------------------------------------
# Class list and wizard logic (in process)
# --------------------------------------------------------------------------------------------------


def test_class_groups_and_search():
    grouped = classes.group_classes(FAKE_CLASSES + [{"key": "x", "name": "X", "group": "weird"}])
    assert [g for g, _ in grouped] == ["organ", "vessel", "tumour", "other"]
    assert [c["key"] for c in grouped[0][1]] == ["liver", "kidney_left"]
    found = [c["key"] for c in FAKE_CLASSES if classes.matches(c, "renal")]
    assert found == ["kidney_left"]
    assert [c["key"] for c in FAKE_CLASSES if classes.matches(c, "LIVER tum")] == ["liver_tumor"]
    assert classes.selection_summary(["a"], 4) == "1 of 4 structures selected"


def test_wizard_validation():
    ok = wizard.NewClass("aorta_false_lumen", "Aorta false lumen", group="vessel", parents=["aorta"])
    assert wizard.validate_classes([ok]) == []
    # the wizard asks only for names; keys, groups, parents, colours are the backend's (classes --new-classes)
    assert wizard.validate_classes([wizard.NewClass("bad key", "Bad"), wizard.NewClass("a", " ")]) == [
        "class 2 (a): give it a name"]
    assert wizard.validate_classes([]) == ["add at least one new class"]
    cases = [wizard.TrainingCase("/i.nrrd", {"aorta_false_lumen": "/m.nrrd", "other": "/o.nrrd"})]
    assert wizard.validate_cases(cases, ["aorta_false_lumen", "second"]) == [
        "case 1: mask for 'other', which is not one of the new classes", "new class 'second' has no training mask"]
    settings = wizard.TrainingSettings("demo", "demo", epochs=0, train="decoder")
    text = "\n".join(wizard.validate_settings(settings, ["demo"]))
    assert "already exists" in text and "at least 1" in text and "what to train" in text
    assert wizard.suggest_key("Aorta, false lumen (TL)") == "aorta_false_lumen_tl"
    made = wizard.NewClass.from_dict({"key": "k", "name": "K", "colour": [1, 2, 3], "synonyms": ["kay"]})
    assert made.color == [1, 2, 3] and made.synonyms == ["kay"] and made.group == "other"
    assert "location" not in made.to_spec()  # unset: the backend's default
    assert wizard.NewClass.from_dict({"key": "k", "name": "K", "trunk": False}).to_spec()["location"] == {
        "trunk": False}
    for bad, fragment in (({"key": "k", "name": "K", "colr": [1, 2, 3]}, "unknown field(s) colr"),
                          ({"key": "k"}, "name")):
        with pytest.raises(ValueError, match=re.escape(fragment)):
            wizard.NewClass.from_dict(bad)


@pytest.mark.parametrize("key, parents", [
    ("deltoid", []), ("liver_lesion", ["liver"]), ("arm_lesion", ["liver", "humerus_left"]),
    ("bone_lesion", ["humerus_left"]), ("heart", []), ("heart", ["humerus_left"]), ("pulmonary_artery", ["liver"]),
])
def test_wizard_trunk_default_is_the_backends(key, parents):
    """The wizard's "trunk only" default, read from the backend's class listings, is the backend's rule
    (UniversalSegLib.registry.location.new_class_location), whatever the parents and key."""
    from UniversalSegLib.registry import ClassInfo, default_registry
    from UniversalSegLib.registry.location import effective_location, new_class_location

    model = [default_registry()["liver"], ClassInfo("humerus_left", "Left humerus", "bone", location={"trunk": False})]
    listing = [{**c.to_dict(), "location": effective_location(c)} for c in model]  # as `classes --json` prints it
    registry = [{**c.to_dict(), "location": effective_location(c)} for c in default_registry().classes]
    by_key = {c.key: c for c in model}
    expected = new_class_location(key, None, [by_key[p] for p in parents])["trunk"]
    assert wizard.default_trunk_only(key, parents, listing, registry) is expected


def test_wizard_training_folder_and_extend_command(tmp_path):
    (tmp_path / "src").mkdir()
    for name in ("ct.nii.gz", "m.nii.gz", "scene.nrrd", "lumen.nrrd"):
        (tmp_path / "src" / name).write_text(name)
    cases = [wizard.TrainingCase(str(tmp_path / "src" / "ct.nii.gz"), {"aorta_true_lumen": str(tmp_path / "src" /
                                                                                               "m.nii.gz")}),
             wizard.TrainingCase(str(tmp_path / "src" / "scene.nrrd"), {"aorta_true_lumen": str(tmp_path / "src" /
                                                                                                "lumen.nrrd")})]
    folder = wizard.write_training_folder(cases, tmp_path / "data")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["images/case001.nii.gz", "images/case002.nrrd", "masks/aorta_true_lumen/case001.nii.gz",
                     "masks/aorta_true_lumen/case002.nrrd"]
    assert (folder / "masks/aorta_true_lumen/case002.nrrd").read_text() == "lumen.nrrd"
    # classes trained together keep their own prompt, group, parents and colour
    new = [wizard.NewClass("aorta_true_lumen", "Aorta true lumen", "", "vessel", ["aorta"]),
           wizard.NewClass("aorta_false_lumen", "Aorta false lumen", " false lumen ", "vessel",
                           ["aorta", "aorta_true_lumen"], (200, 30, 30)),
           wizard.NewClass("gland", "Gland", "thyroid gland", "organ", [], (10, 20, 30), ["thyroid"])]
    assert wizard.validate_classes(new) == []
    settings = wizard.TrainingSettings("demo", "demo-plus", epochs=None, time_budget_minutes=7.5, train="all")
    classes_file = wizard.write_classes_file(new, tmp_path / "job" / "classes.json")
    assert wizard.extend_args(settings, folder, classes_file, "/models/demo-plus") == [
        "extend", "--model", "demo", "--data", str(folder), "--classes-file", str(classes_file),
        "-o", "/models/demo-plus", "--train", "all", "--device", "auto", "--time-budget", "450", "--progress-json"]
    assert json.loads(classes_file.read_text()) == [
        {"key": "aorta_true_lumen", "name": "Aorta true lumen", "group": "vessel", "parents": ["aorta"],
         "color": [230, 160, 40]},
        {"key": "aorta_false_lumen", "name": "Aorta false lumen", "group": "vessel",
         "parents": ["aorta", "aorta_true_lumen"], "color": [200, 30, 30], "prompt": "false lumen"},
        {"key": "gland", "name": "Gland", "group": "organ", "parents": [], "color": [10, 20, 30],
         "prompt": "thyroid gland", "synonyms": ["thyroid"]}]


def test_wizard_cases_from_folder(tmp_path):
    for case, layout in (("case1", "masks/"), ("case2", ""), ("case3", "masks/")):
        (tmp_path / case / "masks").mkdir(parents=True)
        (tmp_path / case / ("ct.nii.gz" if case != "case2" else "image.nrrd")).write_text("x")
        if case != "case3":
            (tmp_path / case / f"{layout}aorta_true_lumen.nii.gz").write_text("x")
    found = wizard.cases_from_folder(tmp_path, ["aorta_true_lumen", "other"])
    assert [Path(c.source).name for c in found] == ["case1", "case2"]  # case3 has no mask of a new class
    assert found[0].masks == {"aorta_true_lumen": str(tmp_path / "case1" / "masks" / "aorta_true_lumen.nii.gz")}
    assert Path(found[1].image).name == "image.nrrd"
    assert wizard.cases_from_folder(tmp_path / "case1", ["aorta_true_lumen"])[0].source == str(tmp_path / "case1")


def test_wizard_report_and_loss_curve():
    report = wizard.parse_report({  # the shape of UniversalSegLib.continual's ExtensionReport.to_dict()
        "model_name": "demo-plus", "parent": {"name": "demo"}, "settings": {"train": "heads+decoder"},
        "timing_s": {"extension": 61.2}, "retention_summary": {"sample": {"extended_mean_retention": 0.95}},
        "heldout": [{"name": "a", "new": {"lumen": {"extended_dice": 0.8, "naive_dice": 0.7}}},
                    {"name": "b", "new": {"lumen": {"extended_dice": 0.6, "naive_dice": None}}}],
        "retention": [{"name": "sample", "old": {"liver": {"extended_retention": 0.97, "naive_retention": 0.61},
                                                  "spleen": {"extended_retention": None}}}]})
    assert report.rows() == [("new class Dice (held out)", "lumen", pytest.approx(0.7), 0.7),
                             ("old class retention", "liver", 0.97, 0.61)]
    assert report.summary.splitlines() == ["Extended demo -> demo-plus", "Training: heads+decoder, 61 s",
                                           "Mean retention on sample: 0.950"]
    history = wizard.LossHistory()
    for step, loss in ((1, 1.0), (2, 0.5), (3, 0.25)):
        assert history.add(backend.ProgressEvent(0.1, "", {"loss": loss, "step": step}))
    assert not history.add(backend.ProgressEvent(0.2, "no loss", {}))
    assert wizard.plot_coordinates(history.points, 100, 50, margin=0) == [(0, 0), (50, 25), (100, 38)]


# --------------------------------------------------------------------------------------------------
# Packaging: every file ships, and only documented Slicer functions are called (in process)
# --------------------------------------------------------------------------------------------------


def _cmake_list(text: str, variable: str) -> list[str]:
    block = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S).group(1)
    return [line.strip().replace("${MODULE_NAME}", "UniversalSeg") for line in block.splitlines() if line.strip()]


def test_every_module_file_is_listed_in_cmake():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts, resources = _cmake_list(text, "MODULE_PYTHON_SCRIPTS"), _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk_py = sorted(str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*.py")
                        if "__pycache__" not in p.parts)
    on_disk_res = sorted(str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file())
    assert sorted(scripts) == on_disk_py
    assert sorted(resources) == on_disk_res
    assert "Resources/UI/UniversalSeg.ui" in resources and "Resources/Icons/UniversalSeg.png" in resources
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert "UniversalSegLib/*" in text and "pyproject.toml" in text  # the bundled backend ships too
    top = (REPO / "CMakeLists.txt").read_text()
    for needed in ("project(UniversalSeg)", 'EXTENSION_CATEGORY "Segmentation"', 'EXTENSION_DEPENDS "PyTorch"',
                   "find_package(Slicer REQUIRED)", "add_subdirectory(UniversalSeg)", "## NEXT_MODULE",
                   "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK", "EXTENSION_ICONURL"):
        assert needed in top
    from PIL import Image

    assert Image.open(REPO / "Resources" / "UniversalSeg.png").size == (128, 128)
    # the screenshot the extension catalogue shows (item 10): where EXTENSION_SCREENSHOTURLS says it is
    screenshot = re.search(r'EXTENSION_SCREENSHOTURLS "[^"]*/main/([^"]+)"', top).group(1)
    with Image.open(REPO / screenshot) as image:
        assert image.format == "PNG" and image.size[0] >= 300 and image.size[1] >= 500
    assert screenshot in (REPO / "docs" / "slicer.md").read_text() or \
        Path(screenshot).name in (REPO / "docs" / "slicer.md").read_text()


def _attribute_calls(path: Path, prefix: str) -> set[str]:
    """Names X used as `slicer.<prefix>.X` or through `import slicer.<prefix> as alias` in a file."""
    tree = ast.parse(path.read_text())
    aliases = {f"slicer.{prefix}"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == f"slicer.{prefix}" and a.asname}
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            owner = ast.unparse(node.value)
            if owner in aliases:
                used.add(node.attr)
    return used


def test_only_documented_slicer_util_functions_are_called():
    listed = {line.strip() for line in (STUB_DIR / "slicer_util_functions.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    files = list(MODULE_DIR.rglob("*.py"))
    for prefix in ("util", "packaging"):
        used = set().union(*(_attribute_calls(f, prefix) for f in files))
        assert used, prefix
        assert used <= listed, f"slicer.{prefix} functions not in Slicer: {sorted(used - listed)}"
    stub_util = ast.parse((STUB_DIR / "slicer" / "util.py").read_text())
    stub_functions = {n.name for n in stub_util.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    assert stub_functions <= listed, sorted(stub_functions - listed)


def test_module_code_is_python_310_compatible():
    for path in list(MODULE_DIR.rglob("*.py")) + list(STUB_DIR.rglob("*.py")):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))


# --------------------------------------------------------------------------------------------------
# The module against the stand-in (each in its own subprocess)
# --------------------------------------------------------------------------------------------------


def test_module_metadata_and_classes(tmp_path):
    run_in_stub("_scenario_module_metadata", tmp_path)


def test_logic_segment_flow(tmp_path):
    run_in_stub("_scenario_segment_flow", tmp_path)


def test_logic_failure_leaves_nothing(tmp_path):
    run_in_stub("_scenario_segment_failure", tmp_path)


def test_cancel_kills_process_tree_and_leaves_nothing(tmp_path):
    run_in_stub("_scenario_cancel_real_process", tmp_path)


def test_dependency_install_on_slicer_512_and_510(tmp_path):
    run_in_stub("_scenario_slicer_installer", tmp_path)


def test_widget_panel_flow(tmp_path):
    run_in_stub("_scenario_widget", tmp_path)


def test_widget_actions(tmp_path):
    run_in_stub("_scenario_widget_actions", tmp_path)


def test_add_classes_flow(tmp_path):
    run_in_stub("_scenario_add_classes", tmp_path)


def test_wizard_dialog_flow(tmp_path):
    run_in_stub("_scenario_wizard_dialog", tmp_path)


# --- issue 24: what real Slicer does that the stand-in used to hide (one test per item) ------------------


def test_selftest_is_a_smoke_test_unless_asked(tmp_path):
    """Item 1: ctest runs UniversalSegTest.runTest: no install, no backend run, no torch by default."""
    run_in_stub("_scenario_selftest_smoke", tmp_path)


def test_result_is_saved_with_the_scene_and_updates_a_previous_one(tmp_path):
    """Item 2 (storage node of the deleted temporary file) and the output segmentation selector."""
    run_in_stub("_scenario_result_storage_and_update", tmp_path)
    run_in_stub("_scenario_widget_output_selector", tmp_path)


def test_torch_floor_is_the_backends_tested_floor():
    """Item 3: the module asks PyTorchUtils for the torch the backend's pyproject names (the tested floor,
    never below MONAI's own), and refuses an older installed torch with a one-line reason."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    with open(REPO / "pyproject.toml", "rb") as f:
        torch_dep = next(Requirement(r) for r in tomllib.load(f)["project"]["dependencies"] if r.startswith("torch"))
    assert dependencies.backend_torch_requirement(REPO) == str(torch_dep.specifier)
    monai_torch = next(Requirement(r) for r in importlib.metadata.requires("monai") if r.startswith("torch"))
    floor = min(Version(s.version) for s in torch_dep.specifier if s.operator == ">=")
    monai_floor = min(Version(s.version) for s in monai_torch.specifier if s.operator == ">=")
    assert floor >= monai_floor, (str(torch_dep), str(monai_torch))
    below = f"{floor.major}.{floor.minor - 1}.0+cu128" if floor.minor else "1.13.1"
    with pytest.raises(dependencies.DependencyError, match=f"too old .*torch{re.escape(str(torch_dep.specifier))}"):
        dependencies.ensure_dependencies(FakeInstaller(torch=below), REPO)
    installer = FakeInstaller(torch=None)
    dependencies.ensure_dependencies(installer, REPO, ask=False)
    assert ("torch", str(torch_dep.specifier)) in installer.calls


def test_terminology_entries_are_read_by_slicer_and_shipped():
    """Item 4: every registry entry has Slicer's 7 fields, and every code is in the shipped context."""
    from UniversalSegLib.registry import default_registry
    from UniversalSegLib.registry.slicer_terminology import CONTEXT_NAME, terminology_context

    shipped_path = MODULE_DIR / "Resources" / "SegmentationCategoryTypeModifier-UniversalSeg.term.json"
    shipped = json.loads(shipped_path.read_text(encoding="utf-8"))
    assert shipped == terminology_context(), "regenerate it: python -m UniversalSegLib.registry.slicer_terminology"
    assert shipped["SegmentationCategoryTypeContextName"] == CONTEXT_NAME and "@schema" in shipped

    def find(items, triplet):
        return next((i for i in items if [i["CodingSchemeDesignator"], i["CodeValue"]] == triplet[:2]), None)

    for info in default_registry().classes:
        fields = classes._split_like_slicer(info.terminology_entry(), "~")
        assert len(fields) == 7 and fields[0] == CONTEXT_NAME, info.terminology_entry()
        term = info.terminology
        category = find(shipped["SegmentationCodes"]["Category"], term["category"])
        kind = find(category["Type"], term["type"])
        assert kind is not None, info.key
        if term.get("modifier"):
            assert find(kind["Modifier"], term["modifier"]) is not None, info.key
    assert classes.standard_segment_name(default_registry()["kidney_left"].terminology_entry()) == "Kidney Left"
    assert classes.standard_segment_name(default_registry()["liver_tumor"].terminology_entry()) == \
        "Neoplasm in Liver"
    assert classes.standard_segment_name("UniversalSeg~SCT^1^A~SCT^2^B~~~~") is None  # 6 fields for Slicer


def test_terminology_is_loaded_at_startup(tmp_path):
    """Item 4: the context is loaded with LoadTerminologyFromFile when Slicer has started."""
    run_in_stub("_scenario_terminology_loaded", tmp_path)


def test_import_model_honours_cancel_and_shows_the_licence(tmp_path):
    """Item 5: PythonQt's getItem returns the current item on Cancel; the licence is shown first."""
    importer = (REPO / "UniversalSegLib" / "importers" / "clip_driven_universal.py").read_text()  # (imports torch)
    assert f'LICENSE = "{backend.PUBLISHED_CHECKPOINT_LICENSE}"' in importer
    assert backend.guess_backbone("/d/clip_driven_universal_swin_unetr.pth") == "swinunetr"
    assert backend.guess_backbone("clip_driven_universal_unet.pth") == "unet"
    assert backend.guess_backbone("weights.pth") is None
    run_in_stub("_scenario_import_cancel", tmp_path)


def test_closing_the_scene_cancels_the_run(tmp_path):
    """Item 6."""
    run_in_stub("_scenario_scene_close", tmp_path)


def test_wizard_closed_by_escape_or_title_bar_stops_training(tmp_path):
    """Item 7."""
    run_in_stub("_scenario_wizard_escape", tmp_path)


def test_result_follows_the_volumes_transform(tmp_path):
    """Item 8."""
    run_in_stub("_scenario_transformed_volume", tmp_path)


def test_labelmap_export_and_temporary_folders(tmp_path):
    """Item 10: the wizard's masks on the whole image grid; two jobs never share a temporary folder."""
    run_in_stub("_scenario_export_and_temp", tmp_path)


def _predict_available() -> bool:
    import argparse

    sub = next(a for a in _backend_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "predict" in sub.choices and "--progress-json" in sub.choices["predict"]._option_string_actions


def test_real_backend_predict(tmp_path, minilm):
    """The exact command line the Logic builds, run for real on the bundled sample CT with a tiny model."""
    if not _predict_available():
        pytest.skip("`universalseg predict --progress-json` is not available yet")
    import torch

    from UniversalSegLib.store import Preprocessing, create_model, save_model

    torch.manual_seed(0)
    models = tmp_path / "models"
    one_window = Preprocessing(spacing=[6.0, 6.0, 6.0], patch_size=[64, 64, 64])  # the sample at 6 mm fits in one
    model, manifest = create_model("tiny-slicer", ["liver", "liver_tumor", "spleen"], backbone="segresnet",
                                   backbone_config={"init_filters": 16}, text_encoder=minilm, preprocessing=one_window)
    save_model(model, manifest, models / "tiny-slicer")
    run_in_stub("_scenario_real_backend", tmp_path, timeout=540, UNIVERSALSEG_MODELS=str(models))


# --------------------------------------------------------------------------------------------------
# Scenarios (run in a subprocess with the stand-in first on PYTHONPATH)
# --------------------------------------------------------------------------------------------------


def _tmp() -> Path:
    return Path(os.environ["TEST_TMP"])


def _load_module(runner=None, installer=None):
    """Import UniversalSeg.py with the module's seams replaced (the Logic creates its defaults from these)."""
    import UniversalSeg

    if runner is not None:
        UniversalSeg.SubprocessRunner = lambda: runner
    if installer is not None:
        UniversalSeg.SlicerDependencyInstaller = lambda: installer
    return UniversalSeg


def _sample_volume_in_study():
    """The sample CT as a volume node inside a study folder of the subject hierarchy."""
    import slicer

    volume = slicer.util.loadVolume(str(SAMPLE_CT))
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    study = sh.CreateFolderItem(sh.GetSceneItemID(), "Study")
    sh.SetItemParent(sh.GetItemByDataNode(volume), study)
    return volume, study


def _scenario_module_metadata():
    import slicer

    UniversalSeg = _load_module()
    parent = type("Parent", (), {"path": str(MODULE_DIR / "UniversalSeg.py")})()
    UniversalSeg.UniversalSeg(parent)
    assert parent.title == "UniversalSeg" and parent.categories == ["Segmentation"]
    assert "Liu" in parent.acknowledgementText and "TotalSegmentator" in parent.acknowledgementText
    assert parent.contributors and "Apply" in parent.helpText
    assert ("startupCompleted()", UniversalSeg.registerSampleData) in slicer.app.connections
    UniversalSeg.registerSampleData()  # no SampleData module here: must be a no-op, not an error
    mro = UniversalSeg.UniversalSegWidget.__mro__
    assert slicer.ScriptedLoadableModule.ScriptedLoadableModuleWidget in mro and slicer.util.VTKObservationMixin in mro
    assert issubclass(UniversalSeg.UniversalSegTest, slicer.ScriptedLoadableModule.ScriptedLoadableModuleTest)
    assert UniversalSeg.sampleCtPath() == SAMPLE_CT
    test_names = [n for n in dir(UniversalSeg.UniversalSegTest) if "test" in n]  # what Slicer's runTest calls
    assert {"test_segment_sample_end_to_end", "test_cancel_leaves_nothing", "test_wizard_validation"} <= set(test_names)
    logic = UniversalSeg.UniversalSegLogic(runner=fake_runner(), installer=FakeInstaller(backend_version=None))
    try:  # console use without consent must not install anything silently
        logic.listModels()
        raise AssertionError("expected DependencyError")
    except UniversalSeg.DependencyError as e:
        assert "setupPythonRequirements" in str(e)


def _scenario_segment_flow():
    import SimpleITK as sitk
    import slicer

    runner = fake_runner()
    UniversalSeg = _load_module()
    logic = UniversalSeg.UniversalSegLogic(runner=runner, installer=FakeInstaller())
    volume, study = _sample_volume_in_study()
    volume.SetAndObserveTransformNodeID("vtkMRMLGridTransformNode1")  # e.g. DICOM geometry regularization
    events, logs = [], []
    seg = logic.segment(volume, classes=["liver", "liver_tumor"], device="cpu", model="demo",
                        progressCallback=events.append, logCallback=logs.append)
    command = runner.commands[-1]
    temp = Path(command[4]).parent
    assert command == [sys.executable, "-m", "UniversalSegLib", "predict", str(temp / "input.nrrd"), "-o",
                       str(temp / "output"), "--model", "demo", "--classes", "liver", "liver_tumor", "--device",
                       "cpu", "--formats", "seg.nrrd,stats", "--progress-json"]
    assert runner.envs[-1]["UNIVERSALSEG_MODELS"] == str(logic.modelsFolder())
    assert not temp.exists(), "the temporary folder must be removed after loading"
    assert [e.fraction for e in events] == [0.0, 0.5, 1.0]
    assert logs == ["plain log text", "a warning on stderr"]
    # one node, one segment per class, overlap kept, geometry and hierarchy set
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert seg.GetName() == f"{volume.GetName()} UniversalSeg"
    assert seg.GetSegmentation().GetSegmentIDs() == ["liver", "liver_tumor"]
    assert (seg.masks["liver"] & seg.masks["liver_tumor"]).sum() == seg.masks["liver_tumor"].sum() > 0
    assert seg.masks["liver"].shape == sitk.GetArrayViewFromImage(volume.image).shape
    assert seg.referenceGeometryVolume is volume
    assert seg.GetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole()) == volume.GetID()
    assert seg.GetTransformNodeID() == "vtkMRMLGridTransformNode1"  # the volume's grid, shown as the volume is
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study
    assert [s.key for s in logic.lastStatistics] == ["liver", "liver_tumor"]
    assert logic.lastStatistics[1].warnings() == ["low confidence (0.55)"]
    assert json.loads(seg.GetAttribute("UniversalSeg.Statistics"))[0]["key"] == "liver"
    # models and classes come from the CLI, once (cached)
    assert logic.listModels() == FAKE_MODELS and logic.listModels() == FAKE_MODELS
    assert logic.listClasses("demo") == FAKE_CLASSES and logic.listClasses("demo") == FAKE_CLASSES
    listed = [c[3:] for c in runner.commands if c[3] in ("models", "classes")]
    assert listed == [["models", "--json"], ["classes", "--json", "--model", "demo"]]
    # all classes: no --classes argument
    logic.segment(volume)
    assert "--classes" not in runner.commands[-1] and "--model" not in runner.commands[-1]


def _scenario_segment_failure():
    import slicer

    def failing(args, env):
        out = Path(args[args.index("-o") + 1])
        out.mkdir(parents=True)
        (out / "half-written.tmp").write_text("x")
        return FakeProcess([[progress(0.3, "x")], [("stderr", "universalseg: error: not a CT: values look like MR")]],
                           returncode=2)

    UniversalSeg = _load_module()
    logic = UniversalSeg.UniversalSegLogic(runner=fake_runner(predict=failing), installer=FakeInstaller())
    volume, _study = _sample_volume_in_study()
    try:
        logic.segment(volume, classes=["liver"])
        raise AssertionError("expected BackendError")
    except UniversalSeg.BackendError as e:
        assert str(e) == "not a CT: values look like MR"
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert list((_tmp() / "slicer-temp").iterdir()) == []


def _scenario_cancel_real_process():
    import psutil
    import slicer

    marker = _tmp() / "started"
    script = _spawning_script(marker)

    class ScriptRunner(process.SubprocessRunner):
        """Runs a stand-in backend (parent + child, writes into the output folder) instead of UniversalSegLib."""

        def start(self, args, env=None, cwd=None):
            out = args[args.index("-o") + 1]
            code = script.replace("time.sleep(60)\n", f"import os; os.makedirs({out!r}); "
                                  f"open(os.path.join({out!r}, 'partial.seg.nrrd'), 'w').write('x'); time.sleep(60)\n",
                                  1)
            return super().start([sys.executable, "-c", code], env, cwd)

    UniversalSeg = _load_module()
    logic = UniversalSeg.UniversalSegLogic(runner=ScriptRunner(), installer=FakeInstaller())
    volume, _study = _sample_volume_in_study()
    events = []
    run = logic.startSegmentation(volume, classes=["liver"], progressCallback=events.append)
    deadline = time.monotonic() + 60
    while not events and time.monotonic() < deadline:
        assert not run.step()
        time.sleep(0.05)
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = psutil.Process(events[0].data["pids"][0])
    parent = psutil.Process(run.job.process.pid)
    assert (run.tempDir / "output" / "partial.seg.nrrd").exists()
    run.cancel()
    assert run.finished and run.cancelled and run.step()
    for p in (parent, child):
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, p
    assert not run.tempDir.exists()
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    try:
        run.wait()
        raise AssertionError("expected JobCancelled")
    except UniversalSeg.JobCancelled:
        pass


def _scenario_slicer_installer():
    import PyTorchUtils
    import slicer
    import slicer.packaging

    installer = dependencies.SlicerDependencyInstaller()
    assert installer.torch_version() is not None and installer.backend_version() is not None  # the dev venv
    # torch: light-the-torch with PyTorchUtils' arguments in a child process; torch is not imported here
    assert installer.install_torch(">=2.8") and PyTorchUtils.calls == []
    assert slicer.util._log["launchConsoleProcess"][-1][1:] == ["-m", "light_the_torch", "install", "torch>=2.8",
                                                                "torchvision"]
    assert "torch" not in sys.modules, "the install step must not import torch into Slicer's process"
    slicer.util._process_results.append(1)  # ltt fails: the error reaches the caller
    try:
        installer.install_torch(">=2.8")
        raise AssertionError("expected CalledProcessError")
    except subprocess.CalledProcessError:
        pass
    pip = slicer.util._log["pip_install"]
    assert pip[0] == "light-the-torch>=0.5"  # PyTorchUtils' own way to get light-the-torch
    pip.clear()
    # Slicer >= 5.12: the backend itself with --no-deps from a copy, then pip_ensure with skip_packages.
    installer.install_backend(REPO, upgrade=True)
    assert slicer.util._log["pip_uninstall"] == ["UniversalSegLib"]
    assert len(pip) == 1 and Path(pip[0][0]).name == "src"
    assert pip[0][1:] == ["--no-deps", "--no-build-isolation"], "build isolation would download setuptools"
    assert not Path(pip[0][0]).exists(), "the temporary copy must be removed"
    ensure = slicer.packaging.calls[-1]
    assert ensure["requirements"] == dependencies.read_backend_requirements(REPO)
    assert ensure["skip_packages"] == ["SimpleITK", "numpy", "requests", "torch"]
    assert ensure["prompt_install"] is False and ensure["requester"] == "UniversalSeg"
    assert ensure["skip_in_testing"] is True, "in Slicer's testing mode (ctest) nothing is installed"
    os.environ[dependencies.FULL_SELFTEST_ENV] = "1"
    installer.install_backend(REPO, upgrade=False)
    assert slicer.packaging.calls[-1]["skip_in_testing"] is False, "the full self-test installs"
    del os.environ[dependencies.FULL_SELFTEST_ENV]
    # Slicer 5.10 (no slicer.packaging): remaining requirements one by one, never the skipped ones.
    source = _tmp() / "backend"
    (source / "UniversalSegLib").mkdir(parents=True)
    (source / "UniversalSegLib" / "__init__.py").write_text('__version__ = "0.1.0"\n')
    (source / "pyproject.toml").write_text(textwrap.dedent("""
        [project]
        name = "UniversalSegLib"
        dependencies = ["numpy>=1", "torch>=2.2", "SimpleITK>=2", "psutil>=5", "surely-not-installed-xyz>=1"]
    """))
    sys.modules["slicer.packaging"] = None
    del slicer.packaging
    pip.clear()
    installer.install_backend(source, upgrade=False)
    assert pip[1:] == ["surely-not-installed-xyz>=1"] and pip[0][1:] == ["--no-deps", "--no-build-isolation"]
    # a build requirement Slicer's Python lacks: a clear error before pip runs
    (source / "pyproject.toml").write_text((source / "pyproject.toml").read_text() +
                                           '[build-system]\nrequires = ["setuptools>=999"]\n')
    pip.clear()
    try:
        installer.install_backend(source, upgrade=False)
        raise AssertionError("expected DependencyError")
    except dependencies.DependencyError as e:
        assert "setuptools>=999" in str(e) and "PythonSlicer -m pip install" in str(e)
    assert pip == []


def _make_widget(runner, installer):
    import qt
    import slicer

    UniversalSeg = _load_module(runner, installer)
    parent = slicer.qMRMLWidget()
    parent.setLayout(qt.QVBoxLayout())
    widget = UniversalSeg.UniversalSegWidget(parent)
    widget.setup()
    return UniversalSeg, widget


def _pump(timer, limit: int = 200) -> None:
    for _ in range(limit):
        if not timer.isActive():
            return
        timer.fire()
        time.sleep(0.01)
    raise AssertionError("the run did not finish")


def _scenario_widget():
    import qt
    import slicer

    runner = fake_runner()
    volume, _study = _sample_volume_in_study()
    UniversalSeg, widget = _make_widget(runner, FakeInstaller())
    ui = widget.ui
    assert ui.inputVolumeSelector.currentNode() is volume and widget._parameterNode.inputVolume is volume
    assert ui.modelSelector.count == 1 and widget.currentModel() == "demo"
    assert "Apache-2.0" in ui.modelInfoLabel.text
    tree = ui.classTree
    assert [tree.topLevelItem(i).text(0) for i in range(tree.topLevelItemCount)] == [
        "Organs", "Vessels", "Tumours and lesions"]
    assert widget.selectedClasses() == ["liver", "kidney_left", "aorta", "liver_tumor"]
    assert ui.selectionLabel.text == "All 4 structures selected" and ui.applyButton.enabled
    # search + select none acts on the shown classes only
    ui.classSearchBox.typeText("kidney")
    assert [k for k, item in widget._classItems.items() if not item.isHidden()] == ["kidney_left"]
    ui.selectNoneButton.click()
    assert widget.selectedClasses() == ["liver", "aorta", "liver_tumor"]
    ui.classSearchBox.typeText("")
    ui.selectNoneButton.click()
    assert widget.selectedClasses() == [] and not ui.applyButton.enabled
    organs = tree.topLevelItem(0)
    organs.setCheckState(0, qt.Qt.Checked)  # a group box checks its classes
    assert widget.selectedClasses() == ["liver", "kidney_left"]
    assert tree.topLevelItem(2).checkState(0) == qt.Qt.Unchecked
    widget._classItems["liver_tumor"].setCheckState(0, qt.Qt.Checked)
    assert widget._parameterNode.classes == ["liver", "kidney_left", "liver_tumor"]
    ui.deviceSelector.setCurrentIndex(2)
    assert widget.currentDevice() == "cpu" and widget.logic.preferredDevice() == "cpu"
    ui.fastCheckBox.setChecked(True)
    assert widget._parameterNode.fast is True
    # Apply -> Cancel while running -> results table
    ui.applyButton.click()
    assert ui.applyButton.text == "Cancel" and not ui.classTree.enabled and ui.progressBar.visible
    assert runner.commands[-1][runner.commands[-1].index("--classes") + 1:][:3] == ["liver", "kidney_left",
                                                                                  "liver_tumor"]
    assert "--fast" in runner.commands[-1] and runner.commands[-1][runner.commands[-1].index("--device") + 1] == "cpu"
    _pump(widget._timer)
    assert ui.applyButton.text == "Apply" and ui.classTree.enabled and not ui.progressBar.visible
    assert ui.progressBar.value == 100
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    table = ui.resultsTable
    assert table.rowCount == 3 and table.item(0, 0).text() == "Liver"
    tumour_row = [r for r in range(3) if table.item(r, 0).text() == "Liver Tumor"][0]
    assert "low confidence" in table.item(tumour_row, 4).text() and table.item(tumour_row, 4).icon() is not None
    assert table.item(0, 4).icon() is None
    assert "sliding window" in ui.logTextEdit.toPlainText()
    # Cancel mid-run: nothing added
    ui.applyButton.click()
    assert ui.applyButton.text == "Cancel"
    process_ = widget._run.job.process
    ui.applyButton.click()
    assert process_.killed and widget._run is None and ui.applyButton.text == "Apply"
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert "Cancelled" in ui.logTextEdit.toPlainText()
    assert list((_tmp() / "slicer-temp").iterdir()) == []
    # a failing run shows the backend's message
    runner.handlers["predict"] = lambda a, e: FakeProcess([[("stderr", "universalseg: error: out of memory")]], 2)
    ui.applyButton.click()
    _pump(widget._timer)
    assert slicer.util._log["errorDisplay"][-1].endswith("out of memory")
    widget.cleanup()


def _scenario_widget_actions():
    import qt
    import slicer

    models = list(FAKE_MODELS)

    def import_handler(args, env):
        models.append({**FAKE_MODELS[0], "name": args[args.index("-o") + 1], "license": "CC BY-NC-ND 4.0"})
        return FakeProcess([[("stdout", "checkpoint read"), ("stdout", "model written")]])

    runner = fake_runner(models=lambda a, e: FakeProcess([json_lines(models)]), **{"import-checkpoint": import_handler})
    installer = FakeInstaller(backend_version="0.0.1")  # stale
    _sample_volume_in_study()
    UniversalSeg, widget = _make_widget(runner, installer)
    ui = widget.ui
    assert "older than the bundled" in ui.backendInfoLabel.text
    # Import model...: file, backbone, name -> the CLI, then the new model is listed, selected, its license shown
    qt.QFileDialog.answers = ["/downloads/clip_driven_universal_unet.pth"]
    qt.QInputDialog.answers = ["unet", "pub-unet"]
    ui.importModelButton.click()
    assert runner.commands[-3][3:] == ["import-checkpoint", "/downloads/clip_driven_universal_unet.pth", "--format",
                                       "clip-driven-universal", "--backbone", "unet", "-o", "pub-unet"]
    assert widget.currentModel() == "pub-unet" and "CC BY-NC-ND" in ui.modelInfoLabel.text
    assert installer.calls[0][0] == "confirm" and installer.calls[-1] == ("backend", REPO, True)
    assert "model written" in ui.logTextEdit.toPlainText() and slicer.util._log["infoDisplay"]
    # a cancelled file dialog does nothing
    started = len(runner.commands)
    ui.importModelButton.click()
    assert len(runner.commands) == started
    # Update backend: always asks, then reinstalls
    ui.updateBackendButton.click()
    assert installer.calls[-2][0] == "confirm" and installer.calls[-1] == ("backend", REPO, True)
    assert ui.backendInfoLabel.text == "Backend 0.1.0 installed"
    # Add classes...: opens the wizard; a kept model becomes the selected one
    ui.addClassesButton.click()
    wizard_ = widget._wizard
    assert wizard_ is not None and wizard_.dialog.visible and wizard_.baseModel == "pub-unet"
    models.append({**FAKE_MODELS[0], "name": "pub-unet-plus"})
    wizard_.createdModel = "pub-unet-plus"
    wizard_.onClose()
    assert widget._wizard is None and widget.currentModel() == "pub-unet-plus"
    assert widget.logic.preferredModel() == "pub-unet-plus"


def _extend_handler(record: dict, outcome: str = "done"):
    """A stand-in `universalseg extend`: checks the data folder, reports losses, writes a model."""
    def handler(args, env):
        import SimpleITK as sitk

        data = Path(args[args.index("--data") + 1])
        out = Path(args[args.index("-o") + 1])
        record["args"] = args
        record["classes"] = json.loads(Path(args[args.index("--classes-file") + 1]).read_text())
        record["files"] = sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file())
        for image_path in sorted((data / "images").iterdir()):
            image = sitk.ReadImage(str(image_path))
            for mask_path in sorted((data / "masks").glob(f"*/{image_path.name}")):
                mask = sitk.ReadImage(str(mask_path))
                assert mask.GetSize() == image.GetSize() and mask.GetOrigin() == image.GetOrigin()
                record.setdefault("mask_voxels", []).append(int(sitk.GetArrayViewFromImage(mask).astype(bool).sum()))

        def partial():
            out.mkdir(parents=True)
            (out.parent / f".{out.name}.tmp123").mkdir()
            return [progress(0.1, "pseudo-labels"), ("stdout", json.dumps({"loss": 1.0, "step": 1}))]

        def finish():
            (out / "manifest.json").write_text("{}")
            report = {"model_name": out.name, "parent": {"name": "demo"}, "settings": {"train": "heads"},
                      "timing_s": {"extension": 12.0}, "notes": ["kept liver"],
                      "heldout": [{"name": "h", "new": {"aorta_false_lumen": {"extended_dice": 0.71}}}],
                      "retention": [{"name": "sample", "old": {"liver": {"extended_retention": 0.96,
                                                                          "naive_retention": 0.52}}}]}
            return [("stdout", json.dumps({"done": True, "model": str(out), "report": report}))]

        batches = [partial, [progress(0.5, "epoch 1"), ("stdout", json.dumps({"loss": 0.6, "step": 2}))],
                   [("stdout", json.dumps({"loss": 0.3, "step": 3})), progress(0.9, "epoch 2")]]
        if outcome == "hang":
            return FakeProcess(batches, hang=True)
        return FakeProcess(batches + [finish])
    return handler


def _scene_pair():
    import numpy as np
    import SimpleITK as sitk
    import slicer

    volume, _study = _sample_volume_in_study()
    array = sitk.GetArrayViewFromImage(volume.image)
    mask = np.zeros(array.shape, bool)
    mask[40:60, 40:55, 50:70] = True
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    seg.addSegmentFromMask("Segment_1", "false lumen", mask, volume.image)
    return volume, seg, int(mask.sum())


def _scenario_add_classes():
    UniversalSeg = _load_module()
    record: dict = {}
    runner = fake_runner(extend=_extend_handler(record))
    logic = UniversalSeg.UniversalSegLogic(runner=runner, installer=FakeInstaller())
    volume, seg, voxels = _scene_pair()
    new = {"key": "aorta_false_lumen", "name": "Aorta false lumen", "group": "vessel", "parents": ["aorta"],
           "prompt": "false lumen of a dissected aorta", "colour": [200, 30, 30], "synonyms": ["FL"], "trunk": True}
    events = []
    run = logic.addClasses([new], [(volume, seg, {"Segment_1": "aorta_false_lumen"})], baseModel="demo",
                           outputName="demo-plus", epochs=2, train="heads+decoder", device="cpu",
                           progressCallback=events.append)
    out = logic.modelsFolder() / "demo-plus"
    args = record["args"]
    assert args[3:] == ["extend", "--model", "demo", "--data", args[7], "--classes-file", args[9], "-o", str(out),
                        "--train", "heads+decoder", "--device", "cpu", "--epochs", "2", "--progress-json"]
    assert Path(args[9]).parent == Path(args[7]).parent, "the classes file lives in the job's temporary folder"
    assert record["classes"] == [{"key": "aorta_false_lumen", "name": "Aorta false lumen", "group": "vessel",
                                  "parents": ["aorta"], "color": [200, 30, 30],
                                  "prompt": "false lumen of a dissected aorta", "synonyms": ["FL"],
                                  "location": {"trunk": True}}]
    assert record["files"] == ["images/case001.nrrd", "masks/aorta_false_lumen/case001.nrrd"]
    assert record["mask_voxels"] == [voxels]
    assert run.modelPath == out and run.report.new_class_dice == {"aorta_false_lumen": 0.71}
    assert run.report.naive_retention == {"liver": 0.52} and "kept liver" in run.report.summary
    assert run.lossHistory.points == [(1.0, 1.0), (2.0, 0.6), (3.0, 0.3)]
    assert [e.fraction for e in events if e.fraction is not None] == [0.1, 0.5, 0.9]
    assert not run.tempDir.exists(), "exported training files are temporary"
    # invalid input: refused before anything runs
    started = len(runner.commands)
    for bad, fragment in (({"key": "liver", "name": "Liver"}, "already in model 'demo'"),
                          ({"key": "x y", "name": "X"}, "letters"), ({"key": "x", "name": ""}, "give it a name")):
        try:
            logic.addClasses([bad], [(volume, seg, {"Segment_1": bad["key"]})], baseModel="demo", outputName="n2")
            raise AssertionError("expected ValueError")
        except ValueError as e:
            assert fragment in str(e)
    assert all(c[3] != "extend" for c in runner.commands[started:])
    assert any("--new-classes" in c for c in runner.commands[started:]), "the backend checked the classes"
    assert sorted(p.name for p in (_tmp() / "slicer-temp").iterdir()) == [], "refused runs leave no exported files"
    # cancel mid-training: no model, no hidden temporary folder, no exported files
    runner.handlers["extend"] = _extend_handler(record, outcome="hang")
    cases = [logic.exportTrainingCase(volume, seg, {"Segment_1": "aorta_false_lumen"}, _tmp() / "cases" / "c1")]
    settings = UniversalSeg.TrainingSettings("demo", "demo-cancelled", epochs=5)
    run = logic.startAddClasses([UniversalSeg.NewClass.from_dict(new)], cases, settings)
    for _ in range(3):
        run.step()
    cancelled_out = logic.modelsFolder() / "demo-cancelled"
    assert cancelled_out.exists()
    run.cancel()
    assert run.cancelled and not cancelled_out.exists() and not run.tempDir.exists()
    assert list(cancelled_out.parent.glob(".demo-cancelled.*")) == []


def _scenario_wizard_dialog():
    UniversalSeg = _load_module()
    record: dict = {}
    registry = FAKE_CLASSES + [{"key": "aorta_false_lumen", "name": "Aorta false lumen", "group": "vessel",
                                "color": [90, 40, 200], "parents": ["aorta"], "prompt": "false lumen of the aorta"}]
    model_classes = FAKE_CLASSES + [{"key": "humerus_left", "name": "Left humerus", "group": "bone",
                                     "color": [250, 250, 225], "location": {"trunk": False}}]
    runner = fake_runner(extend=_extend_handler(record), classes=classes_handler(model_classes, registry))
    logic = UniversalSeg.UniversalSegLogic(runner=runner, installer=FakeInstaller())
    volume, seg, _voxels = _scene_pair()
    from UniversalSegModuleLib.wizard_dialog import AddClassesWizard

    finished = []
    w = AddClassesWizard(logic, "demo", FAKE_MODELS, device="cpu", finishedCallback=finished.append)
    w.show()
    assert w.knownClassSelector.count == 1  # registry classes the model lacks
    w.onNext()
    assert "add at least one new class" in w.errorLabel.text and w.stack.currentIndex == 0
    w.addKnownButton.click()
    assert [c.key for c in w.newClasses()] == ["aorta_false_lumen"]
    assert w.newClasses()[0].parents == ["aorta"] and w.newClasses()[0].color == (90, 40, 200)
    w.addClassButton.click()
    assert w.classTable.cellWidget(0, 6).checked, "inside the aorta: trunk only"
    name = w.classTable.cellWidget(1, 0)
    name.typeText("Aorta, true lumen")
    assert w.classTable.cellWidget(1, 1).text == "aorta_true_lumen"
    # "trunk only" follows the parent (off without one, or inside a structure that may lie in a limb)
    # until the user clicks it
    trunk, parent = w.classTable.cellWidget(1, 6), w.classTable.cellWidget(1, 4)
    assert not trunk.checked
    parent.setCurrentIndex(parent.findData("liver"))
    assert trunk.checked
    parent.setCurrentIndex(parent.findData("humerus_left"))
    assert not trunk.checked
    parent.setCurrentIndex(parent.findData("liver"))
    trunk.click()
    parent.setCurrentIndex(parent.findData("aorta"))
    assert not trunk.checked and w.newClasses()[1].trunk is False
    # the backend checks the classes: its own words, every problem
    w.classTable.cellWidget(1, 1).setText("bad key")
    w.onNext()
    assert w.stack.currentIndex == 0 and "new class 'bad key': key: must be letters, digits and _" in w.errorLabel.text
    w.classTable.setCurrentCell(1, 0)
    w.removeClassButton.click()
    w.onNext()
    assert w.stack.currentIndex == 1 and w.targetClassSelector.currentText == "aorta_false_lumen"
    w.onNext()
    assert "training image" in w.errorLabel.text
    w.volumeSelector.setCurrentNode(volume)
    w.segmentationSelector.setCurrentNode(seg)
    assert w.segmentSelector.currentText == "false lumen"
    w.addPairButton.click()
    assert w.caseTable.rowCount == 1 and w.caseTable.item(0, 2).text() == "aorta_false_lumen"
    w.onNext()
    assert w.stack.currentIndex == 2 and w.outputNameEdit.text == "demo-plus-aorta_false_lumen"
    w.outputNameEdit.setText("demo")
    w.onNext()
    assert "already exists" in w.errorLabel.text
    w.outputNameEdit.setText("demo-plus")
    w.epochsSpinBox.setValue(3)
    w.trainSelector.setCurrentIndex(2)
    w.onNext()
    assert w.stack.currentIndex == 3 and not w.nextButton.enabled
    w.startButton.click()
    assert w.startButton.text == "Cancel training" and not w.backButton.enabled
    _pump(w.timer)
    assert w.stack.currentIndex == 4 and w.reportTable.rowCount == 2
    assert w.reportTable.item(1, 3).text() == "0.520" and "kept liver" in w.reportSummary.text
    assert w.reportTable.item(0, 1).text() == "aorta_false_lumen" and w.reportTable.item(0, 2).text() == "0.710"
    assert w.lossPlot.pixmap.painted and all(isinstance(v, int) for line in w.lossPlot.pixmap.painted for v in line)
    assert record["args"][record["args"].index("--train") + 1] == "all"
    assert record["args"][record["args"].index("--epochs") + 1] == "3"
    assert record["classes"][0]["location"] == {"trunk": True}
    w.keepButton.click()
    assert w.createdModel == "demo-plus" and finished == [w] and not w.dialog.visible


def _scenario_real_backend():
    UniversalSeg = _load_module()
    logic = UniversalSeg.UniversalSegLogic(installer=FakeInstaller())  # the real SubprocessRunner
    assert "tiny-slicer" in [m["name"] for m in logic.listModels()]
    listed = logic.listClasses("tiny-slicer")
    assert [c["key"] for c in listed] == ["liver", "liver_tumor", "spleen"]
    assert all(c["location"]["trunk"] is True for c in listed)  # the location inference applies
    # the wizard's classes checked by the real backend: every problem in its words, and nothing for good ones
    bad = [UniversalSeg.NewClass("liver", "Liver"), UniversalSeg.NewClass("x", "X", parents=["nothing"])]
    assert logic.checkNewClasses(bad, "tiny-slicer") == [
        "class 'liver' is already in model 'tiny-slicer'; choose a new key",
        "class 'x': parent(s) nothing are not classes of the model"]
    assert logic.checkNewClasses([UniversalSeg.NewClass("deltoid", "Deltoid", trunk=False)], "tiny-slicer") == []
    volume, study = _sample_volume_in_study()
    events, logs = [], []
    seg = logic.segment(volume, classes=["liver", "liver_tumor"], device="cpu", model="tiny-slicer", fast=True,
                        progressCallback=events.append, logCallback=logs.append)
    assert seg.GetSegmentation().GetSegmentIDs() == ["liver", "liver_tumor"], logs
    fractions = [e.fraction for e in events if e.fraction is not None]
    assert fractions and fractions == sorted(fractions) and 0.0 <= fractions[0] and fractions[-1] <= 1.0
    import SimpleITK as sitk

    assert seg.masks["liver"].shape == sitk.GetArrayViewFromImage(volume.image).shape
    assert [s.key for s in logic.lastStatistics] == ["liver", "liver_tumor"]
    for row in logic.lastStatistics:
        assert row.voxel_count == int(seg.masks[row.key].sum()), row
    names = {c["key"]: c["name"] for c in listed}
    import slicer
    import vtk

    for key in ("liver", "liver_tumor"):  # names and terminology travel from the registry into the node
        segment = seg.GetSegmentation().GetSegment(key)
        entry, parsed = vtk.reference(""), slicer.vtkSlicerTerminologyEntry()
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), entry), key
        assert slicer.modules.terminologies.logic().DeserializeTerminologyEntry(entry.get(), parsed), entry.get()
        assert segment.GetName() == names[key] and parsed.type[2] and parsed.contextName == "UniversalSeg"
    UniversalSeg.useStandardNames(seg, ["liver", "liver_tumor"])  # the option, on the backend's real tags
    assert [seg.GetSegmentation().GetSegment(k).GetName() for k in ("liver", "liver_tumor")] == [
        "Liver", "Neoplasm in Liver"]


def test_new_classes_get_distinct_colours():
    colours = [wizard.distinct_color(i) for i in range(len(wizard.NEW_CLASS_COLORS))]
    assert len(set(colours)) == len(colours)
    assert wizard.distinct_color(len(colours)) == colours[0]


# --- issue 24 scenarios ---------------------------------------------------------------------------------


def _scenario_selftest_smoke():
    import slicer

    runner, installer = fake_runner(), FakeInstaller(torch=None, backend_version=None)
    UniversalSeg = _load_module(runner, installer)
    slicer.app.testing = True  # Slicer --testing, as ctest runs it
    UniversalSeg.UniversalSegTest().runTest()
    assert installer.calls == [] and runner.commands == [], (installer.calls, runner.commands)
    assert slicer.util._log["pip_install"] == [] and "torch" not in sys.modules
    assert "UniversalSeg" in slicer.modules.terminologies.logic().contexts
    # asked for: the end-to-end tests run too (recorded here instead of run)
    ran = []
    for name in UniversalSeg.UniversalSegTest.FULL_TESTS:
        setattr(UniversalSeg.UniversalSegTest, name, lambda self, n=name: ran.append(n))
    os.environ[dependencies.FULL_SELFTEST_ENV] = "1"
    UniversalSeg.UniversalSegTest().runTest()
    assert ran == list(UniversalSeg.UniversalSegTest.FULL_TESTS)


def _scenario_result_storage_and_update():
    import numpy as np
    import slicer

    runner = fake_runner()
    UniversalSeg = _load_module()
    logic = UniversalSeg.UniversalSegLogic(runner=runner, installer=FakeInstaller())
    volume, _study = _sample_volume_in_study()
    seg = logic.segment(volume, classes=["liver", "liver_tumor"])
    # Saving the scene: the Save dialog ticks nodes modified since read; a storage node must not point at
    # the deleted temporary file (the data would be "saved" nowhere).
    assert seg.GetModifiedSinceRead(), "the result would be left unticked in the Save dialog"
    storage = seg.GetStorageNode()
    assert storage is None or Path(storage.GetFileName()).exists(), storage.GetFileName()
    for node in slicer.mrmlScene.nodes:
        if node.IsA("vtkMRMLStorageNode"):
            assert Path(node.GetFileName()).exists(), f"{node.GetID()} points at a deleted file"
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert seg.GetDisplayNode() is not None
    # Update the previous result: same node, the re-segmented structures replaced, a manual segment kept
    manual = np.zeros_like(seg.masks["liver"])
    manual[1:3, 1:3, 1:3] = True
    seg.addSegmentFromMask("manual", "my drawing", manual, seg.image)
    old_liver = seg.masks["liver"].copy()
    seg.masks["liver"][:] = False  # pretend the user erased it
    again = logic.segment(volume, classes=["liver"], outputSegmentation=seg, standardNames=True)
    assert again is seg and slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    ids = seg.GetSegmentation().GetSegmentIDs()
    assert sorted(ids) == ["liver", "liver_tumor", "manual"] and (seg.masks["liver"] == old_liver).all()
    # the fake backend's file has no terminology: names stay; a removed output node gives a new one
    slicer.mrmlScene.RemoveNode(seg)
    third = logic.segment(volume, classes=["aorta"], outputSegmentation=seg)
    assert third is not seg and third.GetSegmentation().GetSegmentIDs() == ["aorta"]


def _scenario_terminology_loaded():
    import slicer
    import vtk

    from UniversalSegLib.registry import default_registry

    UniversalSeg = _load_module()
    parent = type("Parent", (), {"path": str(MODULE_DIR / "UniversalSeg.py")})()
    UniversalSeg.UniversalSeg(parent)
    assert ("startupCompleted()", UniversalSeg.loadTerminology) in slicer.app.connections
    for _signal, slot in slicer.app.connections:  # Slicer has started
        slot()
    logic = slicer.modules.terminologies.logic()
    context = logic.contexts["UniversalSeg"]
    entry = slicer.vtkSlicerTerminologyEntry()
    for info in default_registry().classes:  # each entry is read by Slicer and its type is in the context
        assert logic.DeserializeTerminologyEntry(info.terminology_entry(), entry), info.terminology_entry()
        category = next(c for c in context["SegmentationCodes"]["Category"] if c["CodeValue"] == entry.category[1])
        assert any(t["CodeValue"] == entry.type[1] for t in category["Type"]), info.key
    # standard names come from the segment's own tag (real vtkSegment::GetTag signature)
    segment = slicer.vtkSegment("Left kidney", (1, 0, 0), {"TerminologyEntry":
                                                            default_registry()["kidney_left"].terminology_entry()})
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.GetSegmentation().segments["kidney_left"] = segment
    UniversalSeg.useStandardNames(node, ["kidney_left"])
    assert segment.GetName() == "Kidney Left"
    value = vtk.reference("")
    assert segment.GetTag("TerminologyEntry", value) and value.get().startswith("UniversalSeg~")


def _scenario_import_cancel():
    import qt
    import slicer

    models = list(FAKE_MODELS)

    def import_handler(args, env):
        models.append({**FAKE_MODELS[0], "name": args[args.index("-o") + 1], "license": "CC BY-NC-ND 4.0"})
        return FakeProcess([[("stdout", "model written")]])

    runner = fake_runner(models=lambda a, e: FakeProcess([json_lines(models)]), **{"import-checkpoint": import_handler})
    _sample_volume_in_study()
    UniversalSeg, widget = _make_widget(runner, FakeInstaller())

    def imports():
        return [c for c in runner.commands if c[3] == "import-checkpoint"]

    path = "/downloads/clip_driven_universal_swin_unetr.pth"
    # Cancel on the backbone: the name is never asked, nothing is imported (PythonQt's static getItem would
    # have returned "unet" and gone on)
    qt.QFileDialog.answers, qt.QInputDialog.answers = [path], [None, "pub-swin"]
    widget.ui.importModelButton.click()
    assert imports() == [] and qt.QInputDialog.answers == ["pub-swin"]
    qt.QFileDialog.answers, qt.QInputDialog.answers = [path], [True, None]  # Cancel on the name
    widget.ui.importModelButton.click()
    assert imports() == []
    qt.QFileDialog.answers, qt.QInputDialog.answers = [path], [True, "pub-swin"]
    slicer.util._answers[:] = [False]  # the licence is declined
    widget.ui.importModelButton.click()
    assert imports() == []
    licence, details = slicer.util._log["confirm"][-1]
    assert "CC BY-NC-ND 4.0" in licence and "non-commercial" in licence and "creativecommons.org" in details
    qt.QFileDialog.answers, qt.QInputDialog.answers = [path], [True, "pub-swin"]
    widget.ui.importModelButton.click()
    assert imports()[-1][3:] == ["import-checkpoint", path, "--format", "clip-driven-universal", "--backbone",
                                 "swinunetr", "-o", "pub-swin"]  # the backbone guessed from the file name
    assert widget.currentModel() == "pub-swin"


def _scenario_scene_close():
    import slicer

    runner = fake_runner()
    _sample_volume_in_study()
    UniversalSeg, widget = _make_widget(runner, FakeInstaller())
    widget.ui.applyButton.click()
    process_ = widget._run.job.process
    slicer.mrmlScene.Clear(0)  # File > Close Scene while the run is going
    for _ in range(10):
        widget._timer.fire()
    assert process_.killed and widget._run is None and not widget._timer.isActive()
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert widget.ui.applyButton.text == "Apply"
    # from the console (no widget): a result whose volume has gone is not loaded
    logic = UniversalSeg.UniversalSegLogic(runner=runner, installer=FakeInstaller())
    volume, _study = _sample_volume_in_study()
    run = logic.startSegmentation(volume, classes=["liver"])
    slicer.mrmlScene.RemoveNode(volume)
    try:
        run.wait()
        raise AssertionError("expected BackendError")
    except UniversalSeg.BackendError as e:
        assert "removed from the scene" in str(e)
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def _scenario_wizard_escape():
    UniversalSeg = _load_module()
    record: dict = {}
    runner = fake_runner(extend=_extend_handler(record, outcome="hang"))
    logic = UniversalSeg.UniversalSegLogic(runner=runner, installer=FakeInstaller())
    import SimpleITK as sitk

    volume, seg, _voxels = _scene_pair()
    (_tmp() / "case").mkdir()
    sitk.WriteImage(volume.image, str(_tmp() / "case" / "ct.nrrd"))
    mask = sitk.GetImageFromArray(seg.masks["Segment_1"].astype("uint8"))
    mask.CopyInformation(volume.image)
    sitk.WriteImage(mask, str(_tmp() / "case" / "lumen.nrrd"))
    case = UniversalSeg.TrainingCase(str(_tmp() / "case" / "ct.nrrd"), {"lumen": str(_tmp() / "case" / "lumen.nrrd")})
    from UniversalSegModuleLib.wizard_dialog import AddClassesWizard

    for close in ("pressEscape", "close"):  # Esc, and the title-bar X (QDialog::closeEvent)
        finished = []
        w = AddClassesWizard(logic, "demo", FAKE_MODELS, device="cpu", finishedCallback=finished.append)
        w.show()
        w.addClassRow(UniversalSeg.NewClass("lumen", "Lumen"))
        w.folderCases.append(case)
        w.outputNameEdit.setText(f"demo-{close}")
        w.startButton.click()
        run = w.run
        assert run is not None and w.timer.isActive()
        getattr(w.dialog, close)()
        assert run.cancelled and run.job.process.killed and w.run is None and not w.timer.isActive()
        assert finished == [w] and not (logic.modelsFolder() / f"demo-{close}").exists()
        w.onClose()  # the Close button afterwards: nothing more happens
        assert finished == [w]


def _scenario_transformed_volume():
    import slicer

    UniversalSeg = _load_module()
    logic = UniversalSeg.UniversalSegLogic(runner=fake_runner(), installer=FakeInstaller())
    volume, _study = _sample_volume_in_study()
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    seg = logic.segment(volume, classes=["liver"])
    assert slicer.util._log["exportNode"][-1]["world"] is False  # the voxels as stored ...
    assert seg.GetTransformNodeID() == transform.GetID()  # ... and the result under the same transform
    grid = seg.GetSegmentation().grids["liver"]  # on the volume's local grid: origin, spacing, axes
    assert grid.GetOrigin() == pytest.approx(volume.image.GetOrigin())
    assert grid.GetDirection() == pytest.approx(volume.image.GetDirection())
    assert grid.GetSpacing() == pytest.approx(volume.image.GetSpacing())


def _scenario_export_and_temp():
    import datetime

    import SimpleITK as sitk
    import slicer

    UniversalSeg = _load_module()
    logic = UniversalSeg.UniversalSegLogic(runner=fake_runner(), installer=FakeInstaller())
    volume, seg, voxels = _scene_pair()
    case = logic.exportTrainingCase(volume, seg, {"Segment_1": "lumen"}, _tmp() / "case")
    mask = sitk.ReadImage(case.masks["lumen"])
    assert mask.GetSize() == volume.image.GetSize() and mask.GetOrigin() == volume.image.GetOrigin()
    assert int(sitk.GetArrayViewFromImage(mask).astype(bool).sum()) == voxels
    # two runs started within the same millisecond (tempDirectory's name resolution)
    frozen = datetime.datetime(2026, 1, 2, 3, 4, 5, 6000)
    slicer.util._now = lambda: frozen
    first = logic.startSegmentation(volume, classes=["liver"])
    second = logic.startSegmentation(volume, classes=["aorta"])
    assert first.tempDir != second.tempDir
    first.cancel()
    assert (second.tempDir / "input.nrrd").exists(), "cancelling one run deleted the other's input"
    second.wait()
    assert second.segmentationNode.GetSegmentation().GetSegmentIDs() == ["aorta"]


def _scenario_widget_output_selector():
    import slicer

    runner = fake_runner()
    _sample_volume_in_study()
    UniversalSeg, widget = _make_widget(runner, FakeInstaller())
    ui = widget.ui
    assert ui.outputSegmentationSelector.currentNode() is None  # "Create new segmentation"
    ui.applyButton.click()
    _pump(widget._timer)
    first = ui.outputSegmentationSelector.currentNode()
    assert first is not None and first.IsA("vtkMRMLSegmentationNode")
    assert ui.segmentationShow3DButton.segmentationNode() is first and ui.segmentationShow3DButton.enabled
    ui.useStandardSegmentNamesCheckBox.setChecked(True)
    assert widget._parameterNode.useStandardSegmentNames is True
    ui.applyButton.click()  # the next run updates the same node
    assert widget._run.outputSegmentation is first and widget._run.standardNames is True
    _pump(widget._timer)
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    ui.outputSegmentationSelector.setCurrentNode(None)  # back to "Create new segmentation"
    ui.applyButton.click()
    _pump(widget._timer)
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2
    assert ui.outputSegmentationSelector.currentNode() is not first
