"""Shared fixtures: one private local Ray per test session, removed afterwards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

VOCALFOLDS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vocalfolds"


@pytest.fixture(scope="session")
def ray_session():
    from pipelines.local_ray import local_ray

    with local_ray(num_cpus=max(2, os.cpu_count() or 2)) as info:
        yield info


@pytest.fixture(scope="session")
def vocalfolds_root() -> Path:
    if not (VOCALFOLDS / "img").is_dir():
        pytest.skip(f"real vocalfolds frames not present at {VOCALFOLDS}")
    return VOCALFOLDS
