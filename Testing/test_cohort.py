"""`universalseg cohort` / `predict_many`: many CTs in one run, bad cases isolated, resume after kill -9,
torchrun sharding (gloo on CPU), case discovery in folder trees, DICOM studies and case lists.

The cohort is small crops of the real sample CT (ct_small), one real CT whose NIfTI header is
damaged, and the real MR; two classes of the bundled model keep each case under a few seconds.
Every cohort run is a subprocess with one thread, so tables of different runs are comparable.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import REPO, shared

CLASSES = ["spleen", "liver"]
GOOD = ["a", "b", "sub_c", "sub_d"]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "UniversalSegLib", *args], capture_output=True, text=True,
                          encoding="utf-8",
                          env=_env(), timeout=timeout, cwd=REPO)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def cohort_args(inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["cohort", str(inputs), "-o", str(out), "--classes", *CLASSES, "--device", "cpu",
            "--formats", "seg.nrrd,stats", *extra]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def report(out: Path) -> dict[str, dict]:
    return {row["case_id"]: row for row in read_csv(out / "run_report.csv")}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A folder tree: four crops of the sample CT (NIfTI and NRRD), a CT with a damaged header, the MR."""
    ct = sitk.ReadImage(str(shared("ct-abdomen", "ct_small.nii.gz")))
    root = tmp_path_factory.mktemp("cohort") / "study"
    (root / "sub").mkdir(parents=True)
    sitk.WriteImage(ct[10:70, 10:70, 4:24], str(root / "a.nii.gz"))
    sitk.WriteImage(ct[40:100, 20:80, 6:26], str(root / "b.nii.gz"))
    sitk.WriteImage(ct[20:80, 30:90, 8:28], str(root / "sub" / "c.nrrd"))
    sitk.WriteImage(ct[50:110, 30:90, 2:22], str(root / "sub" / "d.nii.gz"))
    header = bytearray(gzip.decompress((root / "a.nii.gz").read_bytes()))
    header[70:72] = struct.pack("<h", 999)  # NIfTI datatype code: no such type
    (root / "damaged.nii.gz").write_bytes(gzip.compress(bytes(header)))
    shutil.copy(shared("mr-abdomen", "mr_small.nii.gz"), root / "mr.nii.gz")
    return root


@pytest.fixture(scope="module")
def full_run(cohort, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted single-process run over the whole cohort, with JSON progress."""
    out = tmp_path_factory.mktemp("full") / "out"
    return out, cli(*cohort_args(cohort, out, "--progress-json"))


def test_good_cases_succeed_bad_ones_are_recorded_and_the_exit_code_says_so(full_run, cohort):
    out, run = full_run
    assert run.returncode == 1, run.stderr
    rows = report(out)
    assert sorted(rows) == sorted([*GOOD, "damaged", "mr"])
    assert all(rows[c]["status"] == "ok" for c in GOOD)
    damaged = rows["damaged"]
    assert damaged["status"] == "refused" and "damaged.nii.gz" in damaged["reason"] and "corrupt" in damaged["reason"]
    assert rows["mr"]["status"] == "refused" and "do not look like CT" in rows["mr"]["reason"]
    assert "case mr refused:" in run.stderr and "case damaged refused:" in run.stderr
    for case in GOOD:
        assert {p.name for p in (out / case).iterdir()} == {"segmentation.seg.nrrd", "statistics.csv",
                                                             "statistics.json", "case.json"}
    assert not (out / "damaged").exists() and not (out / "mr").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary left

    table = read_csv(out / "cohort.csv")
    assert [(r["case_id"], r["key"]) for r in table] == [(c, k) for c in GOOD for k in CLASSES]
    for case in GOOD:  # the table holds each case's own statistics
        own = read_csv(out / case / "statistics.csv")
        assert [{k: v for k, v in r.items() if k != "case_id"} for r in table if r["case_id"] == case] == own
    assert any(float(r["volume_ml"]) > 0 for r in table)

    lines = [json.loads(line) for line in run.stdout.splitlines()]
    fractions = [d["progress"] for d in lines[:-1]]
    assert fractions[-1] == 1.0 and all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert lines[-2]["cases_done"] == lines[-2]["cases_total"] == 6
    assert lines[-1]["done"] is True and lines[-1]["counts"] == {"ok": 4, "skipped": 0, "refused": 2, "failed": 0}


def test_cohort_gives_the_same_statistics_as_single_predict_calls(full_run, cohort, tmp_path):
    out, _ = full_run
    single = tmp_path / "single"
    run = cli("predict", str(cohort / "sub" / "c.nrrd"), "-o", str(single), "--classes", *CLASSES,
              "--device", "cpu", "--formats", "stats")
    assert run.returncode == 0, run.stderr
    assert read_csv(single / "statistics.csv") == read_csv(out / "sub_c" / "statistics.csv")


def test_kill_9_then_rerun_skips_finished_cases_and_ends_with_the_same_table(full_run, cohort, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "UniversalSegLib", *cohort_args(cohort, out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*/case.json")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/case.json")}
    assert finished, "the first case never finished"
    assert len(finished) < len(GOOD), "every case finished before the kill: nothing left to resume"

    rerun = cli(*cohort_args(cohort, out))
    assert rerun.returncode == 1, rerun.stderr
    rows = report(out)
    assert {c for c in GOOD if rows[c]["status"] == "skipped"} == set(finished)
    assert {c for c in GOOD if rows[c]["status"] == "ok"} == set(GOOD) - set(finished)
    assert {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/case.json") if p.parent.name in finished} \
        == finished  # not recomputed, not rewritten
    assert (out / "cohort.csv").read_bytes() == (full_run[0] / "cohort.csv").read_bytes()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_torchrun_two_ranks_give_the_same_table_as_one_process(full_run, cohort, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "UniversalSegLib", *cohort_args(cohort, out)],
                         capture_output=True, text=True, encoding="utf-8", env=_env(), timeout=400, cwd=REPO)
    assert run.returncode != 0  # two cases are refused
    rows = report(out)
    assert {r["rank"] for r in rows.values()} == {"0", "1"}
    assert all(rows[c]["status"] == "ok" for c in GOOD), rows
    assert (out / "cohort.csv").read_bytes() == (full_run[0] / "cohort.csv").read_bytes()
    assert not list(out.glob(".run-report-rank*"))


def test_another_model_or_other_settings_never_share_a_table(full_run, cohort, tmp_path, monkeypatch, capsys):
    from UniversalSegLib.cli import main
    from UniversalSegLib.store import BUNDLED_DIR, DEFAULT_MODEL
    from UniversalSegLib.store.modelfile import stamp

    out = tmp_path / "out"
    shutil.copytree(full_run[0], out)
    before = (out / "cohort.csv").read_bytes()
    models = tmp_path / "models"
    shutil.copytree(BUNDLED_DIR / DEFAULT_MODEL, models / "other")
    manifest = json.loads((models / "other" / "manifest.json").read_text())
    renamed = stamp({**manifest, "name": "other"})  # a model of its own: renamed and re-stamped as a user would
    (models / "other" / "manifest.json").write_text(json.dumps(renamed))
    monkeypatch.setenv("UNIVERSALSEG_MODELS", str(models))

    assert main(cohort_args(cohort, out, "--model", "other")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one table never mixes two models" in err[0].lower(), err
    args = cohort_args(cohort, out)
    args[args.index("liver")] = "kidney_left"
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (classes" in err[0], err
    assert (out / "cohort.csv").read_bytes() == before


def test_predict_many_yields_results_and_isolates_bad_cases(cohort):
    import UniversalSegLib as us

    results = list(us.predict_many([cohort / "a.nii.gz", cohort / "mr.nii.gz"], classes=["spleen"], device="cpu"))
    assert [(r.case_id, r.status) for r in results] == [("a", "ok"), ("mr", "refused")]
    assert results[0].result.keys == ["spleen"] and results[0].statistics[0]["key"] == "spleen"
    assert results[1].result is None and "--allow-non-ct" in results[1].reason


# --- discovery (no model) ---------------------------------------------------------------------------------


def _dicom_study(root: Path) -> None:
    """study/series: a CT series plus a localiser in one folder; study/mr: an MR series."""
    import pydicom
    from support import write_dicom_series

    ct = sitk.ReadImage(str(shared("ct-abdomen", "ct_small.nii.gz")))[20:80, 20:80, :]
    write_dicom_series(ct[:, :, 0:12], root / "series")
    write_dicom_series(ct[:, :, 12:24], root / "localiser", series_description="scout")
    write_dicom_series(ct[:, :, 0:10], root / "mr", series_description="T1")
    for path in (root / "localiser").iterdir():
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.SeriesNumber = 2
        ds.save_as(root / "series" / f"loc-{path.name}")
    shutil.rmtree(root / "localiser")
    for path in (root / "mr").iterdir():
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)


def test_discovery_finds_ct_series_and_skips_localisers_and_non_ct_with_a_note(tmp_path, capsys):
    from UniversalSegLib.cli import main
    from UniversalSegLib.cohort import discover_cases
    from UniversalSegLib.io import read_image

    tree = tmp_path / "tree"
    _dicom_study(tree / "patient1" / "study")
    (tree / "patient2").mkdir()
    shutil.copy(shared("ct-abdomen", "ct_small.nii.gz"), tree / "patient2" / "ct.nii.gz")
    (tree / "patient2" / "notes.txt").write_text("not an image")
    out = tree / "out"  # the cohort's outputs inside the tree are never inputs
    (out / "x").mkdir(parents=True)
    shutil.copy(tree / "patient2" / "ct.nii.gz", out / "x" / "mask.nii.gz")

    found = discover_cases([tree], exclude=[out])
    assert [c.case_id for c in found.cases] == ["patient1_study_series", "patient2_ct"]
    assert read_image(found.cases[0].path).GetSize()[2] == 12  # the CT series, not the localiser
    assert len(found.notes) == 2
    assert any("localiser" in n for n in found.notes) and any("modality MR, not CT" in n for n in found.notes)

    assert main(["cohort", str(tree), "-o", str(out), "--list"]) == 0  # a case list to edit and give back
    listed = capsys.readouterr()
    assert listed.err.count("skipped") == 2
    (tmp_path / "cases.csv").write_text(listed.out)
    assert discover_cases([tmp_path / "cases.csv"]).cases == found.cases


def test_case_lists_give_ids_and_relative_paths_and_duplicates_are_refused(tmp_path):
    from UniversalSegLib.cohort import discover_cases
    from UniversalSegLib.errors import InputError

    (tmp_path / "img").mkdir()
    for name in ("x.nii.gz", "y.nrrd"):
        (tmp_path / "img" / name).write_bytes(b"")
    (tmp_path / "list.csv").write_text("case_id,path\nP 001,img/x.nii.gz\n,img/y.nrrd\n")
    found = discover_cases([tmp_path / "list.csv"])
    assert [(c.case_id, c.path) for c in found.cases] == [("P_001", tmp_path / "img" / "x.nii.gz"),
                                                          ("y", tmp_path / "img" / "y.nrrd")]
    (tmp_path / "list.json").write_text(json.dumps([{"case_id": "k", "path": "img/x.nii.gz"}, "img/y.nrrd"]))
    assert [c.case_id for c in discover_cases([tmp_path / "list.json"]).cases] == ["k", "y"]

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="both be case 'x'"):
        discover_cases([tmp_path / "img" / "x.nii.gz", tmp_path / "other" / "x.nii.gz"])
    with pytest.raises(InputError, match="does not exist"):
        discover_cases([tmp_path / "nothing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no CT image"):
        discover_cases([tmp_path / "empty"])
