"""What follows the training of a segmenter, whichever job trained it (segment, adapt): scores on labelled frames
with overlays, the training curves, ONNX export with a parity check, registration. Each job's flow
(segment_flow, adapt_flow) names its job; this is the part they share."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np

from pipelines.job_run import job_run, log_curves
from training import tracking
from training.adapt.config import AdaptJobConfig
from training.data.normalize import normalize, to_unit_bchw
from training.data.sources import DataSpec, load_data
from training.export import check_parity, export_segmenter
from training.models.unet import count_parameters
from training.segment.config import SegmentJobConfig
from training.segment.predict import score
from training.segment.train import TrainedSegmenter
from training.visualize import comparison_grid, save_png

SegmenterJobConfig = SegmentJobConfig | AdaptJobConfig


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


def train_and_release(
    cfg: SegmenterJobConfig,
    runner: Callable[[SegmenterJobConfig, str], TrainedSegmenter],
    eval_spec: DataSpec | None,
    out_dir: Path,
    register_as: tuple[str, str | None] | None = None,
    fresh: bool = False,
) -> VariantResult:
    """Run a job that trains a segmenter (`runner(cfg, tracking_uri)`: the segment or the adapt job), resuming a
    stopped run of the same name unless `fresh`; score on `eval_spec`, export, log."""
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
