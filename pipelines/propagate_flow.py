"""Mask propagation end to end: MLflow run → Ray Train job → ONNX export + sequence parity → registry → evaluation.

What a --model or --segmenter names (`locate_model`, `reference_segmenter`) is looked up in training/ (a Ray Tune
trial of the patient job needs it too, and nothing imports pipelines); both are re-exported here for the CLI.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow

from pipelines.job_run import job_run, log_curves
from training import tracking
from training.data.simulator import simulate_sequences
from training.data.sources import DataSpec
from training.models.propagation.network import count_parameters
from training.propagate import train as propagate_train
from training.propagate.config import PropagateJobConfig
from training.propagate.export import (
    GRAPHS,
    ExportedGraphs,
    OnnxBackend,
    export_propagation,
)
from training.propagate.models import last_weights_path, locate_model, save_model
from training.propagate.pseudo_labels import reference_segmenter
from training.propagate.scoring import evaluate_sequences, named_sequences, sequence_parity

__all__ = ["PropagateResult", "locate_model", "reference_segmenter", "train_and_export"]


@dataclass
class PropagateResult:
    run_id: str
    model_path: Path
    graphs: ExportedGraphs
    parity: dict
    evaluation: dict | None
    train_seconds: float
    parameters: int
    registered_versions: dict[str, str] = field(default_factory=dict)


def train_and_export(
    cfg: PropagateJobConfig,
    out_dir: Path,
    eval_spec: DataSpec | None = None,
    register_as: tuple[str, str | None] | None = None,
    fresh: bool = False,
) -> PropagateResult:
    """Train (resuming a run of the same name unless `fresh`), export the graphs, check parity, register, score."""
    with job_run(cfg, out_dir, fresh) as (cfg, tracking_uri, run):
        started = time.perf_counter()
        trained = propagate_train.run(cfg, tracking_uri)
        train_seconds = time.perf_counter() - started
        mlflow.log_metric("train_seconds", train_seconds)
        model_path = save_model(trained.model, cfg, out_dir / f"{cfg.name}.pt")
        if trained.last_weights is not None:  # kept beside the average, to measure what averaging changed
            save_model(trained.last_weights, cfg, last_weights_path(model_path))

        graphs = export_propagation(trained.model, out_dir, cfg.name, cfg.data.size, cfg.memory, run.info.run_id)
        frames, truth = simulate_sequences(1, 12, seed=cfg.data.sim_seed + 777, style="real-like", size=cfg.data.size)
        parity = sequence_parity(trained.model, graphs, frames[0], truth[0], cfg.memory)
        mlflow.log_metrics({"onnx_parity_jf_abs_diff": parity["jf_abs_diff"]})
        evaluation = None
        if eval_spec is not None:
            pictures = out_dir / f"{cfg.name}_eval"
            evaluation = evaluate_sequences(
                OnnxBackend(graphs), named_sequences(eval_spec), cfg.memory, pictures=pictures
            )
            mlflow.log_metrics(
                {"eval_jf": evaluation["mean"]["J&F"], "eval_copy_first_jf": evaluation["copy_first_mean"]["J&F"]}
            )
            mlflow.log_artifacts(str(pictures), artifact_path="propagation")
            (out_dir / f"{cfg.name}_eval.json").write_text(json.dumps(evaluation, indent=2))
        log_curves(tracking_uri, run.info.run_id, cfg.name, out_dir, ("train_loss", "val_jf"))
        versions = {}
        if register_as is not None:
            for graph in GRAPHS:
                versions[graph] = tracking.register_onnx(graphs[graph], f"{register_as[0]}-{graph}", register_as[1])
        return PropagateResult(
            run_id=run.info.run_id,
            model_path=model_path,
            graphs=graphs,
            parity=parity,
            evaluation=evaluation,
            train_seconds=train_seconds,
            parameters=count_parameters(trained.model),
            registered_versions=versions,
        )
