"""`universalseg cohort INPUT... -o OUT`: segment a whole cohort, resumable, on one or many GPUs/nodes.

Single process: `universalseg cohort /data/ct -o /data/out`. Several GPUs or nodes: the same
command under `torchrun --nproc_per_node=N -m UniversalSegLib cohort ...` (see docs/cohort.md):
every rank finds the same cases, the unfinished ones are dealt out round-robin (rank r takes every
N-th), each rank drives one GPU (LOCAL_RANK) and writes its own case folders and
`.run-report-rank<r>.jsonl`; after a barrier rank 0 writes the merged `cohort.csv` and run report.
Ranks only synchronise (gloo on CPU, whatever the device): no tensor is exchanged.

Exit code: 0 when every case is segmented (now or earlier), 1 when a case was refused or failed
(listed in run_report.csv), 2 for a user error before any case ran (the usual one line).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

EXIT_CASES_FAILED = 1
TABLE_EVERY_S = 30.0  # cohort.csv is rewritten at most this often during a run (and always at the end)
# Ranks wait for the slowest one at the end: far longer than the default 30 minutes of a process group.
BARRIER_TIMEOUT = timedelta(days=7)
PARTIAL_REPORT = ".run-report-rank{rank}.jsonl"


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add the `cohort` sub-command."""
    p = sub.add_parser("cohort", help="segment many CTs: folders, DICOM trees or case lists; resumable; torchrun",
                       description="Segment every CT found in the inputs with one loaded model. Per case the outputs "
                                   "of `predict` go to OUT/<case id>/; OUT/cohort.csv has one row per case and "
                                   "structure; OUT/run_report.csv says what became of each case. Rerunning the "
                                   "same command skips finished cases. Under torchrun the cases are shared "
                                   "between the ranks.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="CT files, DICOM series folders, folder trees to search, or .csv/.json case lists")
    p.add_argument("-o", "--output", help="cohort output folder (created if missing)")
    p.add_argument("--model", default=None, help="model name or folder (default: the bundled model)")
    p.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                   help="structures to segment (default: all the model's classes)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: the rank's GPU)")
    p.add_argument("--formats", default=None, help="per-case formats as for `predict` (default: seg.nrrd,nifti,stats, "
                                                   "plus dicom-seg for DICOM cases)")
    p.add_argument("--fast", action="store_true", help="as for `predict`")
    p.add_argument("--allow-non-ct", action="store_true",
                   help="segment images that do not look like CT instead of refusing them (noted per case)")
    p.add_argument("--progress-json", action="store_true", help="progress as JSON lines on stdout (rank 0)")
    p.add_argument("--list", action="store_true",
                   help="only print the cases found as a CSV case list (case_id,path); skipped inputs on stderr")
    p.set_defaults(func=run_cohort)


def run_cohort(args: argparse.Namespace) -> int:
    from UniversalSegLib.cohort.discovery import discover_cases
    from UniversalSegLib.errors import InputError

    if args.output is None and not args.list:
        raise InputError("give the cohort's output folder with -o/--output")
    if args.output is not None and not args.output.strip():  # Path("") is the current folder
        raise InputError("the cohort's output folder (-o) is an empty path")
    out = Path(args.output).expanduser() if args.output else None
    discovery = discover_cases(args.inputs, exclude=[out] if out else ())
    for note in discovery.notes if os.environ.get("RANK", "0") == "0" else ():  # once, not once per rank
        print(f"universalseg: {note}", file=sys.stderr)
    if args.list:  # a case list in the CSV format the command reads back
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["case_id", "path"])
        writer.writerows([case.case_id, str(case.path)] for case in discovery.cases)
        return 0
    from UniversalSegLib.io import NonCTWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonCTWarning)  # noted per case in the run report instead
        return _run(args, out, discovery)


def _run(args: argparse.Namespace, out: Path, discovery) -> int:
    import torch.distributed as dist

    from UniversalSegLib.cohort.runner import CohortRunner
    from UniversalSegLib.cohort.table import CohortTable
    from UniversalSegLib.device import resolve_device
    from UniversalSegLib.io.itk_log import python_output_apart
    from UniversalSegLib.train.distributed import barrier, dist_info_from_env, shutdown_distributed

    start = time.perf_counter()
    info = dist_info_from_env()
    device = resolve_device(args.device, info)
    runner = CohortRunner(args.model, args.classes, device=device, fast=args.fast, formats=args.formats,
                          allow_non_ct=args.allow_non_ct, output=out)
    runner.claim_output(write=info.is_main)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("gloo", rank=info.rank, world_size=info.world_size, timeout=BARRIER_TIMEOUT)
    try:
        done, todo = runner.finished_before(discovery.cases)
        barrier()  # every rank has the same list of unfinished cases before any rank adds to it
        mine = todo[info.rank::info.world_size]
        if info.is_main and done:
            print(f"universalseg: {len(done)} of {len(discovery.cases)} cases finished by an earlier run "
                  "with this model and settings: skipped", file=sys.stderr)
        table = CohortTable(out, discovery.cases, runner.identity, runner.settings)
        for result in done:
            table.add(result.case_id, result.statistics)
        with python_output_apart():  # the reading thread's ITK captures must not swallow our lines
            _compute(runner, mine, table, out, info, args.progress_json)
        barrier()
        if not info.is_main:
            return 0
        return _finish(runner, discovery, done, table, out, info.world_size, args.progress_json,
                       time.perf_counter() - start)
    finally:
        shutdown_distributed()


def _compute(runner, cases, table, out: Path, info, progress_json: bool) -> None:
    """Segment this rank's cases; each outcome goes to the rank's partial report as it finishes."""
    from UniversalSegLib.cohort.progress import CohortProgress

    progress = CohortProgress(len(cases), progress_json) if info.is_main else None
    partial = out / PARTIAL_REPORT.format(rank=info.rank)
    partial.write_text("", encoding="utf-8")
    tag = f"[rank {info.rank}] " if info.enabled else ""
    last_table = time.monotonic()
    try:
        for result in runner.run(cases, progress):
            result.rank = info.rank
            with open(partial, "a", encoding="utf-8") as f:
                f.write(json.dumps(result.report_row()) + "\n")
            if result.ok:
                table.add(result.case_id, result.statistics)
            lines = [f"{result.status}: {result.reason}"] if not result.ok else []
            for line in [*lines, *result.notes]:
                text = f"universalseg: {tag}case {result.case_id} {line}"
                progress.note(text) if progress is not None else print(text, file=sys.stderr, flush=True)
            if progress is not None:
                progress.case_finished(result.case_id, result.status)
            if info.is_main and time.monotonic() - last_table >= TABLE_EVERY_S:
                table.refresh()  # other ranks' finished cases too
                table.write()
                last_table = time.monotonic()
    finally:
        if progress is not None:
            progress.close()


def _finish(runner, discovery, done, table, out: Path, world: int, progress_json: bool, wall_s: float) -> int:
    """Rank 0: merge the ranks' reports, write the final table and run report, print the summary."""
    from UniversalSegLib.cohort.table import write_run_report

    rows = [r.report_row() for r in done]
    for partial in sorted(out.glob(PARTIAL_REPORT.format(rank="*"))):
        if int(partial.name.split("rank")[1].split(".")[0]) < world:
            rows += [json.loads(line) for line in partial.read_text(encoding="utf-8").splitlines() if line.strip()]
        partial.unlink()  # also stale ones of an earlier, larger run
    table.refresh()
    table_path = table.write()
    report_csv, report_json = write_run_report(out, rows, discovery.notes, runner.identity, runner.settings, wall_s)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "refused", "failed")}
    if progress_json:
        from UniversalSegLib.progress import json_line

        json_line(done=True, outputs={"table": str(table_path), "report": str(report_csv),
                                      "report:json": str(report_json)}, counts=counts)
    else:
        print(f"cases: {counts['ok']} segmented, {counts['skipped']} finished earlier, {counts['refused']} refused, "
              f"{counts['failed']} failed ({wall_s:.0f} s)")
        print(f"table: {table_path}\nreport: {report_csv}")
    return EXIT_CASES_FAILED if counts["refused"] or counts["failed"] else 0
