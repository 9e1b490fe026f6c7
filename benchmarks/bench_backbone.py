"""Backbone runtimes on CPU at default precision (float32): seconds per window of `UniversalModel.features`.

Variants (each timed in the same process, interleaved round by round, so their ratios share the
machine's load; CPU seconds of the process are given beside wall seconds):

  contiguous     weights and input in the default (contiguous) layout
  channels_last  weights channels-last 3D (what `predict` loads), input as `predict` stacks it
  cl_input       weights and input channels-last 3D
  batch2/batch4  channels-last, 2 or 4 windows per call (seconds per window)
  compile        `torch.compile` (inductor, CPU) of `features`, channels-last; compile time printed
  onnxruntime    the backbone exported to ONNX (`torch.onnx.export`), ONNX Runtime CPU EP
  openvino       the same ONNX file read by OpenVINO, CPU plugin, precision hint f32 (its PyTorch
                 front end fails the tracer's check on this model)

Thread count: `--threads` (torch and ONNX Runtime intra-op). A CPU without AMX: run the script with
`ONEDNN_MAX_CPU_ISA=AVX512_CORE` (or `AVX2`); ONNX Runtime does not read that variable (its MLAS
kernels use AVX-512/AVX2 FMA for float32, never AMX). Features of every variant are compared with
the contiguous run (max absolute difference of the voxel and image features).

    python benchmarks/bench_backbone.py --variants contiguous channels_last batch2 onnxruntime
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_backbone.py --threads 1 --repeat 3
    python benchmarks/bench_backbone.py --model PATH_TO_IMPORTED_MODEL --patch 96   # e.g. the U-Net
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "UniversalSegLib" / "resources" / "sample" / "ct_abdomen.nii.gz"
VARIANTS = ("contiguous", "channels_last", "cl_input", "batch2", "batch4", "compile", "onnxruntime", "openvino")


def sample_windows(model_path: str | None, patch: int, count: int) -> torch.Tensor:
    """`count` real windows of the sample CT, preprocessed as `predict` does (cut from its centre)."""
    import SimpleITK as sitk

    from UniversalSegLib.inference.preprocess import preprocess
    from UniversalSegLib.store import DEFAULT_MODEL, load_model

    manifest = load_model(model_path or DEFAULT_MODEL).manifest
    volume = preprocess(sitk.ReadImage(str(SAMPLE)), manifest.preprocessing).volume
    volume = np.pad(volume, [(0, max(0, patch + count * 8 - s)) for s in volume.shape])
    centre = [max(0, (s - patch) // 2 - count * 4) for s in volume.shape]
    windows = [volume[c0 + 8 * i:c0 + 8 * i + patch, c1:c1 + patch, c2:c2 + patch]
               for i, (c0, c1, c2) in enumerate([centre] * count)]
    return torch.from_numpy(np.stack(windows)).unsqueeze(1).contiguous()


class Features(torch.nn.Module):
    """`model.features` as a module (for export and compile)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.features(x)


def onnx_session(model, example: torch.Tensor, threads: int, folder: str):
    """(session, export seconds): the backbone exported with the TorchScript exporter, float32."""
    import onnxruntime as ort  # not a dependency: install it, or put a --target install on PYTHONPATH

    path = os.path.join(folder, "features.onnx")
    t = time.perf_counter()
    torch.onnx.export(Features(model).eval(), (example,), path, input_names=["x"],
                      output_names=["image", "voxel"], dynamic_axes={"x": {0: "b"}}, opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session, time.perf_counter() - t, ort.__version__


def openvino_model(model, example: torch.Tensor, threads: int, folder: str):
    """(compiled model, conversion seconds, version): float32 inference forced (the CPU plugin would
    otherwise pick bf16 on a CPU with AMX), `threads` inference threads, latency mode."""
    import openvino as ov  # not a dependency: put a --target install on PYTHONPATH

    path = os.path.join(folder, "features_ov.onnx")
    t = time.perf_counter()
    torch.onnx.export(Features(model).eval(), (example,), path, input_names=["x"],
                      output_names=["image", "voxel"], opset_version=17, dynamo=False)
    converted = ov.Core().read_model(path)
    compiled = ov.Core().compile_model(converted, "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    return compiled, time.perf_counter() - t, ov.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model name or folder (default: the bundled model)")
    parser.add_argument("--patch", type=int, help="window edge (default: the manifest's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each variant runs 4 windows per round")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from UniversalSegLib.store import DEFAULT_MODEL, load_model

    loaded = load_model(args.model or DEFAULT_MODEL)
    patch = args.patch or loaded.manifest.preprocessing.patch_size[0]
    model = loaded.model.eval()
    x = sample_windows(args.model, patch, 4)
    cl = torch.channels_last_3d
    print(f"torch {torch.__version__}, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(all)')}, "
          f"{args.threads} thread(s), {patch}^3 windows, 4 windows per round, {args.repeat} rounds")

    runners, notes = {}, {}
    with torch.inference_mode():
        def per_window(fn, batch, memory=torch.contiguous_format, weights=torch.contiguous_format):
            def run():
                model.to(memory_format=weights)
                outs = [fn(x[i:i + batch].contiguous(memory_format=memory)) for i in range(0, 4, batch)]
                return torch.cat([o[0] for o in outs]), torch.cat([o[1].float() for o in outs])
            return run

        runners["contiguous"] = per_window(model.features, 1)
        runners["channels_last"] = per_window(model.features, 1, weights=cl)
        runners["cl_input"] = per_window(model.features, 1, memory=cl, weights=cl)
        runners["batch2"] = per_window(model.features, 2, memory=cl, weights=cl)
        runners["batch4"] = per_window(model.features, 4, memory=cl, weights=cl)
    if "compile" in args.variants:
        model.to(memory_format=cl)
        compiled = torch.compile(Features(model), dynamic=False)
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            compiled(x[:1].contiguous(memory_format=cl))
        spent = time.perf_counter() - t, time.process_time() - c
        notes["compile"] = f"first call (compile) {spent[0]:.1f} s wall, {spent[1]:.1f} s CPU"
        with torch.inference_mode():
            runners["compile"] = per_window(compiled, 1, memory=cl, weights=cl)
    folder = tempfile.mkdtemp(prefix="bench_backbone_")
    if "onnxruntime" in args.variants:
        model.to(memory_format=torch.contiguous_format)
        session, seconds, version = onnx_session(model, x[:1], args.threads, folder)
        notes["onnxruntime"] = f"onnxruntime {version}, export + session {seconds:.1f} s"

        def run_ort():
            outs = [session.run(None, {"x": x[i:i + 1].numpy()}) for i in range(4)]
            return torch.from_numpy(np.concatenate([o[0] for o in outs])), torch.from_numpy(
                np.concatenate([o[1] for o in outs]))
        runners["onnxruntime"] = run_ort

    if "openvino" in args.variants:
        model.to(memory_format=torch.contiguous_format)
        compiled_ov, seconds, version = openvino_model(model, x[:1], args.threads, folder)
        notes["openvino"] = f"openvino {version}, conversion + compilation {seconds:.1f} s"

        def run_ov():
            outs = [compiled_ov(x[i:i + 1].numpy()) for i in range(4)]
            return (torch.from_numpy(np.concatenate([o[0] for o in outs])),
                    torch.from_numpy(np.concatenate([o[1] for o in outs])))
        runners["openvino"] = run_ov

    chosen = [v for v in VARIANTS if v in args.variants and v in runners]
    wall = {v: [] for v in chosen}
    cpu = {v: [] for v in chosen}
    reference = None
    diffs = {}
    with torch.inference_mode():
        for v in chosen:  # warm-up round (oneDNN primitive caches), features compared here
            out = runners[v]()
            if reference is None:
                reference = out
            diffs[v] = (float((out[0] - reference[0]).abs().max()), float((out[1] - reference[1]).abs().max()))
        for _ in range(args.repeat):
            for v in chosen:
                t, c = time.perf_counter(), time.process_time()
                runners[v]()
                wall[v].append((time.perf_counter() - t) / 4)
                cpu[v].append((time.process_time() - c) / 4)
    base = min(cpu[chosen[0]])
    print("| variant | wall s/window (best) | CPU s/window (best) | CPU vs first | max diff image / voxel feature |")
    print("|---|---|---|---|---|")
    for v in chosen:
        print(f"| {v} | {min(wall[v]):.3f} | {min(cpu[v]):.3f} | {base / min(cpu[v]):.2f}x | "
              f"{diffs[v][0]:.1e} / {diffs[v][1]:.1e} |")
    for v, note in notes.items():
        print(f"{v}: {note}")


if __name__ == "__main__":
    main()
