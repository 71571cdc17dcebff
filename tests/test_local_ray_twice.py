"""Two local Rays one after the other in one process (bench-propagate --ensemble trains one member per local Ray):
the second used to fail to start its GCS, because Ray keeps the first auth token for the whole process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # starts Ray twice
def test_second_local_ray_in_one_process_starts() -> None:
    script = textwrap.dedent(
        """
        import ray
        from pipelines.local_ray import local_ray

        for run in range(2):
            with local_ray(num_cpus=1):
                print("run", run, ray.get(ray.remote(lambda: 41 + 1).remote()), flush=True)
        """
    )
    # Its own process: the test session's Ray (conftest) would be reused rather than started twice.
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run 0 42" in done.stdout and "run 1 42" in done.stdout, done.stdout
