"""Ray Train smoke runs: 2 gloo workers, a checkpoint per epoch, and resume of a stopped run."""

import pytest

from training.config import load_config
from training.segment import train as segment_train
from training.segment.config import SegmentJobConfig

pytestmark = pytest.mark.slow


def tiny_job(tmp_path, epochs: int, **extra) -> SegmentJobConfig:
    overrides = [
        "name=smoke",
        f"runs_dir={tmp_path}",
        "source.count=16",
        "source.size=64",
        "model.base_width=8",
        "model.depth=2",
        "model.blocks_per_level=1",
        "compute.workers=2",
        "compute.batch_size=4",
        f"compute.epochs={epochs}",
        "val.kind=sim",
        "val.style=real-like",
        "val.count=4",
        "val.size=64",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(SegmentJobConfig, None, overrides)


def test_two_workers_train_checkpoint_and_resume(ray_session, tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = segment_train.run(tiny_job(tmp_path, epochs=1), tracking_uri)
    assert first.metrics["epoch"] == 1 and first.metrics["resumed_after_epoch"] == 0
    assert 0.0 <= first.metrics["val_mean_dice"] <= 1.0
    assert (tmp_path / "ray" / "smoke").is_dir()

    # Same name and storage: the run continues after its last checkpoint instead of starting over.
    second = segment_train.run(tiny_job(tmp_path, epochs=2), tracking_uri)
    assert second.metrics["epoch"] == 2 and second.metrics["resumed_after_epoch"] == 1
    assert second.model.cfg.base_width == 8


def test_fda_style_job_runs(ray_session, tmp_path):
    cfg = tiny_job(
        tmp_path,
        epochs=1,
        name="smoke-fda",
        **{
            "style.method": "fda",
            "target.kind": "sim",
            "target.style": "real-like",
            "target.count": 8,
            "target.size": 64,
            "target.labelled": "false",
        },
    )
    result = segment_train.run(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.metrics["epoch"] == 1
