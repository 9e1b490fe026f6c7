"""`import UniversalSegLib` changes nothing process-wide; the `universalseg` command makes its settings itself.

A user who imports us (before or after MONAI) keeps MONAI's optional features and glibc's allocator as
they were; the lean MONAI import and the allocator tuning are cli.main's. Each case runs in a fresh
interpreter: both settings are process-wide and would leak into other tests.
"""

from __future__ import annotations

import subprocess
import sys

# Records every mallopt call made through `runtime` (the one place that tunes the allocator) instead of making it.
RECORD_MALLOPT = """
from UniversalSegLib import runtime
calls = []
runtime._mallopt = lambda: (lambda parameter, value: calls.append(parameter) or 1)
"""


def _python(code: str) -> str:
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, encoding="utf-8")
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_import_leaves_monai_optional_features_alone():
    # The inference pipeline imports MONAI; its optional imports must see the installed extras.
    out = _python("import sys, UniversalSegLib, UniversalSegLib.inference.predict; "
                  "from UniversalSegLib._lean_monai import SkipMonaiExtras; "
                  "import monai.networks.nets.transchex as t, monai.metrics.embedding_collapse as e; "
                  "print(any(isinstance(f, SkipMonaiExtras) for f in sys.meta_path), "
                  "t.transformers[1], e.has_sklearn)")
    assert out.split() == ["False", "True", "True"]


def test_cli_installs_lean_monai():
    out = _python("import sys; from UniversalSegLib import cli; "
                  "from UniversalSegLib._lean_monai import SkipMonaiExtras; "
                  "code = cli.main(['models']); "
                  "print(code, any(isinstance(f, SkipMonaiExtras) for f in sys.meta_path))")
    assert out.split()[-2:] == ["0", "True"]


def test_import_leaves_the_allocator_alone_and_the_predict_command_tunes_it():
    out = _python(RECORD_MALLOPT
                  + "import UniversalSegLib.inference.predict, UniversalSegLib.cli, UniversalSegLib.train\n"
                  "print(len(calls))\n"
                  "runtime.tune_for_command('models'); print(len(calls))\n"
                  "runtime.tune_for_command('predict'); print(calls == [runtime._M_MMAP_THRESHOLD])\n")
    assert out.split() == ["0", "0", "True"]
