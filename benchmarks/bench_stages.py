"""Where CPU inference time goes: per-stage seconds of `predict` for 1, 14, 46 and 256 classes.

Stages (exclusive times, summed over the run; measured by wrapping the functions that do them):

  backbone     `UniversalModel.features` (the network up to the 8-channel voxel feature)
  heads        LPG head parameters + the dynamic 1x1x1 heads (`apply_dynamic_heads`)
  blending     Gaussian weights and adding each window's logits into the float16 band
  sigmoid      final rows: logits -> probabilities (and, once fused, the threshold test)
  restoration  model grid -> input grid (SimpleITK resampling, threshold, boxes, components)
  rules        post-processing (`disjoint`, `apply_rules`, `mean_within`)
  writers      `write_outputs` (NIfTI masks, statistics) into a temporary folder
  other        the rest of `predict` (reading, preprocessing, the loop's bookkeeping)

The bundled model (46 classes) runs through `predict` for 1 (vertebrae_L3), 14 (`--classes liver`
brings 13 vessels) and 46 classes, all on the full grid of windows; "liver-roi" is `--classes liver`
with the class-subset windows `predict` uses by default (`inference/roi.py`). "256" grows the model
to 256 heads (copies of its own) and runs the sliding window and restoration only (no registry holds
256 classes; rules and writers are skipped). CPU time (the process's own) is steadier than wall time
on a shared machine: other processes' load stretches the wall clock, hardly a process's CPU seconds.
Each case runs in a fresh process (peak RSS is that process's VmHWM; peak RssAnon is sampled, see `AnonymousPeak`).
`--baseline DIR` runs the same cases with the code of another checkout (e.g. main) interleaved with ours, so ratios
come from one run on the same (possibly busy) machine.

    python benchmarks/bench_stages.py                       # sample CT, 1 14 46 256 classes
    python benchmarks/bench_stages.py --inputs sample fine --cases 1 46 --baseline /tmp/base28
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python benchmarks/bench_stages.py ...   # a CPU without AMX
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "UniversalSegLib" / "resources" / "sample" / "ct_abdomen.nii.gz"
CLINICAL_SPACING = (0.8, 0.8, 1.5)
CASES = {"1": ["vertebrae_L3"], "14": ["liver"], "46": None, "256": None, "liver-roi": ["liver"]}
STAGES = ("backbone", "heads", "blending", "sigmoid", "restoration", "rules", "writers")


class StageClock:
    """Exclusive seconds per stage: a wrapped call's time goes to its stage, less its wrapped callees'."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []

    def _run(self, stage: str, fn, *args, **kwargs):
        self._stack.append([0.0])
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = time.perf_counter() - t
            inner = self._stack.pop()[0]
            self.seconds[stage] += spent - inner
            if self._stack:
                self._stack[-1][0] += spent

    def wrap(self, owner, name: str, stage: str) -> None:
        """Time `owner.name` (a function or method) as `stage`; generators are timed per step."""
        import inspect

        fn = getattr(owner, name, None)
        if fn is None:
            return
        clock = self
        if inspect.isgeneratorfunction(fn):
            def timed(*args, **kwargs):
                gen = fn(*args, **kwargs)
                while True:
                    try:
                        item = clock._run(stage, next, gen)
                    except StopIteration:
                        return
                    yield item
        else:
            def timed(*args, **kwargs):
                return clock._run(stage, fn, *args, **kwargs)
        setattr(owner, name, timed)


def _instrument(clock: StageClock) -> None:
    from UniversalSegLib.inference import predict as predict_module
    from UniversalSegLib.inference import restore, sliding_window
    from UniversalSegLib.model import universal

    clock.wrap(universal.UniversalModel, "features", "backbone")
    clock.wrap(universal.UniversalModel, "head_parameters", "heads")
    clock.wrap(sliding_window, "apply_dynamic_heads", "heads")
    clock.wrap(sliding_window, "window_weights", "blending")
    for name, stage in (("add", "blending"), ("release", "sigmoid")):
        clock.wrap(sliding_window._Band, name, stage)
    for name in ("add", "finish"):
        clock.wrap(restore.SlabRestorer, name, "restoration")
    for name in ("disjoint", "apply_rules", "mean_within"):
        clock.wrap(predict_module, name, "rules")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class AnonymousPeak:
    """Peak of the process's anonymous memory (RssAnon), sampled every 10 ms by a thread.

    VmHWM also counts the shared libraries' resident pages, which the kernel evicts or not depending
    on what else runs (+-50 MB between identical runs on the shared machine); RssAnon is what the
    pipeline itself allocates."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_mb("RssAnon"))


def _grown(classes: int):
    """The bundled model grown to `classes` heads (copies of its own), loaded as `predict` loads it."""
    import torch

    from UniversalSegLib.store import DEFAULT_MODEL, load_model

    loaded = load_model(DEFAULT_MODEL)
    net = loaded.model
    extra = classes - net.num_classes
    net.add_classes(net.class_embeddings[torch.arange(extra) % net.num_classes],
                    init_from=[i % net.num_classes for i in range(extra)])
    net.lpg.fold_text(net.class_embeddings)
    net.to(memory_format=torch.channels_last_3d)
    return loaded


def worker(case: str, image_path: str) -> dict:
    """One case in this process: stage seconds, total, peak RSS and per-class voxel counts."""
    import torch

    clock = StageClock()
    _instrument(clock)
    anonymous = AnonymousPeak()
    t0, cpu0 = time.perf_counter(), time.process_time()
    if case == "256":
        counts = _window_and_restore_only(_grown(256), image_path)
    else:
        import inspect

        from UniversalSegLib import predict, runtime
        from UniversalSegLib.io import write_outputs

        if hasattr(runtime, "tune_for_command"):
            runtime.tune_for_command("predict")  # the allocator setting `universalseg predict` makes (cli.main)
        # 1 and 14 classes profile the full grid; "liver-roi" is `--classes liver` as shipped (windows
        # only around the liver, inference/roi.py). A checkout without ROI windows runs its full grid.
        options = {"subset_windows": case == "liver-roi"} if "subset_windows" in inspect.signature(
            predict).parameters else {}
        result = predict(image_path, classes=CASES[case], device="cpu", **options)
        keep = os.environ.get("BENCH_STAGES_KEEP")  # the driver's --keep: outputs stay there
        with tempfile.TemporaryDirectory() as tmp:
            clock._run("writers", write_outputs, result, keep or tmp, ["nifti", "stats"])
        counts = {c.info.key: c.voxel_count for c in result.classes}
    total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    anon = anonymous.stop()
    stages = {s: round(clock.seconds.get(s, 0.0), 2) for s in STAGES}
    stages["other"] = round(total - sum(clock.seconds.values()), 2)
    return {"case": case, "total_s": round(total, 2), "cpu_s": round(cpu, 2), "stages": stages,
            "peak_rss_mb": round(_status_mb("VmHWM")),
            "peak_anon_mb": round(anon),
            "threads": torch.get_num_threads(), "counts": counts}


def _window_and_restore_only(loaded, image_path: str) -> dict:
    import torch

    from UniversalSegLib.inference.preprocess import preprocess
    from UniversalSegLib.inference.restore import SlabRestorer
    from UniversalSegLib.inference.sliding_window import probability_slabs
    from UniversalSegLib.io import read_image

    reference = read_image(Path(image_path))
    pre = loaded.manifest.preprocessing
    prepared = preprocess(reference, pre)
    net, counts, restorers = loaded.model, {}, {}
    with torch.inference_mode():
        for slab in probability_slabs(net, prepared.volume, list(range(net.num_classes)), pre.patch_size,
                                      pre.overlap, torch.device("cpu")):
            restorer = restorers.setdefault(slab.position, SlabRestorer(prepared.grid, reference, pre.threshold))
            restorer.add(slab.start, slab.values, slab.last)
            if slab.last:
                counts[str(slab.position)] = restorers.pop(slab.position).finish().mask.count
    return counts


def make_clinical(folder: Path) -> Path:
    """The sample CT resampled (linear) to 0.8 x 0.8 x 1.5 mm, int16 like a scanner's file."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(SAMPLE))
    size = [round(n * s / f) for n, s, f in zip(image.GetSize(), image.GetSpacing(), CLINICAL_SPACING)]
    fine = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), CLINICAL_SPACING,
                         image.GetDirection(), -1024.0, sitk.sitkInt16)
    out = folder / "sample_0.8x0.8x1.5.nii.gz"
    sitk.WriteImage(fine, str(out))
    return out


def run_case(code: Path, case: str, image: Path, keep: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    if keep:
        env["BENCH_STAGES_KEEP"] = str(keep)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", case, str(image)],
                          env=env, capture_output=True, text=True, cwd=str(code))
    if proc.returncode:
        raise SystemExit(f"case {case} failed with {code}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", choices=["sample", "fine"], default=["sample"])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. main's) run interleaved with ours")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--keep", type=Path, help="write each case's outputs (masks, statistics) under this folder")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    codes = {"ours": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    rows = []
    print(f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset)')} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}")
    print("| input | classes | code | total (s) | CPU (s) | " + " | ".join(STAGES)
          + " | other | peak RSS (MB) | peak RssAnon (MB) |")
    print("|---" * (len(STAGES) + 8) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        images = {"sample": SAMPLE} | ({"fine": make_clinical(Path(tmp))} if "fine" in args.inputs else {})
        for name in args.inputs:
            for case in args.cases:
                for _ in range(args.repeat):
                    for label, code in codes.items():
                        keep = args.keep / f"{label}-{name}-{case}" if args.keep else None
                        r = run_case(code, case, images[name], keep) | {"input": name, "code": label}
                        rows.append(r)
                        stages = " | ".join(f"{r['stages'][s]:.2f}" for s in (*STAGES, "other"))
                        memory = f"{r['peak_rss_mb']} | {r['peak_anon_mb']}"
                        times = f"{r['total_s']:.2f} | {r['cpu_s']:.2f}"
                        print(f"| {name} | {case} | {label} | {times} | {stages} | {memory} |", flush=True)
    if args.baseline:
        for name in args.inputs:
            for case in args.cases:
                mine = [r for r in rows if r["input"] == name and r["case"] == case]
                best = {(c, k): min(r[k] for r in mine if r["code"] == c)
                        for c in ("ours", "baseline") for k in ("total_s", "cpu_s")}
                ratios = [best["baseline", k] / best["ours", k] for k in ("total_s", "cpu_s")]
                same = all(r["counts"] == mine[0]["counts"] for r in mine)
                print(f"{name} {case} classes: baseline/ours = {ratios[0]:.2f}x wall, {ratios[1]:.2f}x CPU time; "
                      f"voxel counts identical: {same}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
