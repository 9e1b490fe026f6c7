"""Benchmark: peak memory of reading a model's weights (issue 23: the safetensors library replaced a hand parser).

Each reader runs in a fresh process; it prints the peak resident set (VmHWM) and the anonymous part
at the end (RssAnon: memory of its own, not file pages the kernel can drop), minus the process's
baseline after imports. Readers:
  read_tensors   store.modelfile.read_tensors, then .float() in place per tensor (what load_model does)
  load_file      safetensors.torch.load_file, then the same: the baseline (its tensors are views of the mapped file)
  load_model     store.load_model on the same file as a model folder (bundled model only)

    python benchmarks/bench_model_load.py              # the bundled model, and a synthetic 400 MB float16 file
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, checkout_env  # benchmarks/_common.py (this script's folder)

CHILD = r'''
import sys
import torch  # noqa: F401  (imported before the baseline is taken)
import safetensors.torch
from UniversalSegLib.store import load_model
from UniversalSegLib.store.modelfile import read_tensors
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon"):
            out[key] = int(value.split()[0]) / 1024
    return out
base = status()
reader, path = sys.argv[1], sys.argv[2]
if reader == "load_model":
    kept = load_model(path)
else:
    tensors = read_tensors(path) if reader == "read_tensors" else safetensors.torch.load_file(path)
    for k, v in tensors.items():  # one tensor at a time, like load_model
        if v.is_floating_point():
            tensors[k] = v.float()
    kept = tensors
end = status()
print(f"{end['VmHWM'] - base['VmRSS']:.0f} {end['RssAnon'] - base['RssAnon']:.0f}")
'''


def measure(reader: str, path: Path) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, reader, str(path)], capture_output=True,
                         text=True, check=True, env=checkout_env()).stdout.split()
    return float(out[0]), float(out[1])


def report(label: str, path: Path, readers: list[str], size_mb: float) -> None:
    print(f"{label} ({size_mb:.0f} MB file): peak RSS above baseline / anonymous memory kept, MB")
    results = {r: measure(r, path.parent if r == "load_model" else path) for r in readers}
    for reader, (peak, anon) in results.items():
        ratio = peak / results["load_file"][0]
        print(f"  {reader:13} peak {peak:7.0f}  kept {anon:7.0f}  peak / load_file's {ratio:.2f}")


def main() -> int:
    bundled = REPO / "UniversalSegLib" / "resources" / "models" / "universalseg-demo"
    weights = bundled / "weights.safetensors"
    report("bundled universalseg-demo", weights, ["load_file", "read_tensors", "load_model"],
           weights.stat().st_size / 2**20)
    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.safetensors"
        save_file({f"t{i}": torch.randn(1024, 1024).half() for i in range(200)}, str(big))
        report("synthetic 200 x 1M float16 tensors", big, ["load_file", "read_tensors"], big.stat().st_size / 2**20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
