"""The serving image has no torch: importing the serving side must not pull in torch or training code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import sys
import serving.app, serving.codec, serving.onnx_model, serving.resolve
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "training"))
print(leaked)
sys.exit(1 if leaked else 0)
"""


def test_serving_imports_neither_torch_nor_training() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"leaked modules: {result.stdout}\n{result.stderr[-2000:]}"
