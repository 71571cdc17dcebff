"""One segmentation variant end to end: MLflow run → Ray Train job → evaluation → ONNX export + parity → registry.

Used by `endoflow train` and by the demo (once per variant); model, loss and data code live in `training/`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import mlflow
import numpy as np

from training import tracking
from training.config import StrictModel, to_yaml
from training.data.normalize import normalize, to_unit_bchw
from training.data.sources import DataSpec, load_data
from training.export import check_parity, export_segmenter
from training.models.unet import count_parameters
from training.segment import train as segment_train
from training.segment.config import SegmentJobConfig
from training.segment.predict import score
from training.visualize import comparison_grid, plot_curves, save_png

JobConfig = TypeVar("JobConfig", bound=StrictModel)  # any job config with name, runs_dir and tracking


@dataclass
class VariantResult:
    name: str
    run_id: str
    summary: dict
    onnx_path: Path
    parity_max_abs_diff: float
    train_seconds: float
    parameters: int
    predictions: np.ndarray = field(repr=False)
    registered_version: str | None = None


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


def train_and_export(
    cfg: SegmentJobConfig,
    eval_spec: DataSpec | None,
    out_dir: Path,
    register_as: tuple[str, str | None] | None = None,
    fresh: bool = False,
    runner: Callable[..., segment_train.TrainedSegmenter] = segment_train.run,
) -> VariantResult:
    """Train `cfg` (resuming a stopped run of the same name unless `fresh`), score on `eval_spec`, export, log."""
    with job_run(cfg, out_dir, fresh) as (cfg, tracking_uri, run):
        started = time.perf_counter()
        trained = runner(cfg, tracking_uri)
        train_seconds = time.perf_counter() - started
        mlflow.log_metric("train_seconds", train_seconds)

        summary, predictions = {}, np.zeros((0,), np.uint8)
        if eval_spec is not None:
            images, masks = load_data(eval_spec)
            summary, predictions = score(trained.model, images, masks)
            mlflow.log_metrics({"eval_mean_dice": summary["mean_dice"], "eval_mean_iou": summary["mean_iou"]})
            mlflow.log_metrics({f"eval_dice_{k}": v for k, v in summary["dice"].items() if v is not None})
            grid = comparison_grid(images, {"truth": masks, cfg.name: predictions})
            mlflow.log_artifact(str(save_png(grid, out_dir / f"{cfg.name}_overlays.png")))
            (out_dir / f"{cfg.name}_scores.json").write_text(json.dumps(summary, indent=2))
        log_curves(tracking_uri, run.info.run_id, cfg.name, out_dir, ("train_loss", "val_mean_dice"))

        onnx_path = export_segmenter(trained.model, out_dir / f"{cfg.name}.onnx", cfg.source.size, run.info.run_id)
        sample = load_data(eval_spec or cfg.source)[0][:4]
        parity = check_parity(trained.model, onnx_path, normalize(to_unit_bchw(sample)))
        mlflow.log_metrics(
            {"onnx_parity_max_abs_diff": parity.max_abs_diff, "onnx_label_agreement": parity.label_agreement}
        )
        version = None
        if register_as is not None:
            version = tracking.register_onnx(onnx_path, register_as[0], register_as[1])
        return VariantResult(
            name=cfg.name,
            run_id=run.info.run_id,
            summary=summary,
            onnx_path=onnx_path,
            parity_max_abs_diff=parity.max_abs_diff,
            train_seconds=train_seconds,
            parameters=count_parameters(trained.model),
            predictions=predictions,
            registered_version=version,
        )


def log_curves(tracking_uri: str, run_id: str, name: str, out_dir: Path, keys: Sequence[str]) -> None:
    """The per-epoch history of the run's metrics `keys` as one picture, <name>_curves.png, kept by MLflow."""
    client = mlflow.tracking.MlflowClient(tracking_uri)
    curves = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in keys}
    if any(curves.values()):
        mlflow.log_artifact(str(plot_curves(curves, out_dir / f"{name}_curves.png", name, "value")))
