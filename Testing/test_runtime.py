"""glibc allocator tuning (UniversalSegLib.runtime): each setting has the effect it promises.

Each case runs in a fresh interpreter: the settings are process-wide and would leak into other tests.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import torch
from UniversalSegLib import runtime
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
assert runtime.{setting}
for size in (24, 28, 30):  # freeing blocks under 32 MB raises glibc's default mmap threshold
    x = torch.ones(size * 2**18); del x
before = rss()
blocks = [torch.ones(5 * 2**20) for _ in range(10)]  # 10 x 20 MB
del blocks
print(rss() - before)
"""


def _kept_mb(setting: str) -> int:
    run = subprocess.run([sys.executable, "-c", PROBE.format(setting=setting)], capture_output=True, text=True,
                         encoding="utf-8")
    assert run.returncode == 0, run.stderr[-2000:]
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_inference_setting_returns_freed_blocks_and_training_setting_keeps_them():
    assert _kept_mb("return_large_blocks(256 * 1024)") < 20  # 200 MB of 20 MB blocks freed: given back
    assert _kept_mb("retain_freed_memory()") > 100  # kept for reuse (glibc default keeps ~80 MB here)
