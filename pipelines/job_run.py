"""The MLflow run around one training job (segment, adapt, propagate): the config carries the run id to the Ray
workers, the config is logged and saved beside the artifacts, and the per-epoch curves end up as one picture."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import mlflow

from training import tracking
from training.config import StrictModel, to_yaml
from training.visualize import plot_curves

JobConfig = TypeVar("JobConfig", bound=StrictModel)  # any job config with name, runs_dir and tracking


@contextmanager
def job_run(cfg: JobConfig, out_dir: Path, fresh: bool) -> Iterator[tuple[JobConfig, str, mlflow.ActiveRun]]:
    """The MLflow run of one job: yields the config carrying the run id (workers log into that run), the tracking
    URI and the run. `fresh` drops Ray's checkpoints of a run of the same name instead of resuming it."""
    tracking_uri = tracking.use_tracking(cfg.tracking, cfg.runs_dir)
    if fresh:
        shutil.rmtree(Path(cfg.runs_dir) / "ray" / cfg.name, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    with mlflow.start_run(run_name=cfg.name) as run:
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"run_id": run.info.run_id})})
        tracking.log_config(cfg)
        (out_dir / f"{cfg.name}.yaml").write_text(to_yaml(cfg))
        yield cfg, tracking_uri, run


def log_curves(tracking_uri: str, run_id: str, name: str, out_dir: Path, keys: Sequence[str]) -> None:
    """The per-epoch history of the run's metrics `keys` as one picture, <name>_curves.png, kept by MLflow."""
    client = mlflow.tracking.MlflowClient(tracking_uri)
    curves = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in keys}
    if any(curves.values()):
        mlflow.log_artifact(str(plot_curves(curves, out_dir / f"{name}_curves.png", name, "value")))
