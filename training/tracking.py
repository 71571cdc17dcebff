"""MLflow: where runs go, what every job logs, and the model registry.

Default store: sqlite plus an artifact folder, both inside the project's `runs/` directory, so nothing lands in
$HOME or the current directory; MLFLOW_TRACKING_URI (a server, PostgreSQL-backed in production) overrides it.
Workers log per-epoch metrics into the run the driver opened (its id travels in the job config), so one job
is one run, not one per worker.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from pydantic import Field

from training.config import StrictModel
from training.models.encoders import encoder_provenance


class TrackingConfig(StrictModel):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite in runs/")
    experiment: str = "endoflow"
    run_id: str | None = Field(None, description="set by the driver: the run workers log into")


def default_tracking_uri(runs_dir: str | Path = "runs") -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


def use_tracking(config: TrackingConfig, runs_dir: str | Path = "runs") -> str:
    """Point mlflow at the configured store and experiment; returns the tracking URI (to hand to workers)."""
    uri = config.tracking_uri or default_tracking_uri(runs_dir)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    if client.get_experiment_by_name(config.experiment) is None:
        # With a local store, artifacts would default to ./mlruns of whatever the cwd is: keep them in runs/.
        location = None if _is_server(uri) else (Path(runs_dir).resolve() / "mlartifacts").as_uri()
        client.create_experiment(config.experiment, artifact_location=location)
    mlflow.set_experiment(config.experiment)
    return uri


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def log_config(config: StrictModel, name: str = "config.json") -> None:
    """The full config as an artifact, and its flattened leaves as params."""
    tree = config.model_dump(mode="json")
    mlflow.log_dict(tree, name)
    mlflow.log_params({key: _short(value) for key, value in _flatten(tree).items()})
    model = tree.get("model")
    encoder = model.get("encoder", model.get("key_encoder")) if isinstance(model, dict) else None
    if encoder is not None:
        # Which starting weights, down to the file's hash: a run must say what it was initialised from.
        mlflow.set_tags({f"endoflow.{key}": value for key, value in encoder_provenance(encoder).items()})


def log_worker_metrics(tracking_uri: str, run_id: str | None, metrics: dict[str, float], step: int) -> None:
    if run_id is None:
        return
    client = MlflowClient(tracking_uri)
    for key, value in metrics.items():
        if value is not None and value == value:  # skip None and NaN
            client.log_metric(run_id, key, float(value), step=step)


def register_onnx(
    onnx_path: Path, model_name: str, alias: str | None, extra_metadata: dict[str, Any] | None = None
) -> str:
    """Log the ONNX file in the active run (mlflow.onnx flavour), register it, set the alias; returns the version."""
    import onnx

    info = mlflow.onnx.log_model(
        onnx.load(str(onnx_path)),
        name="model",
        registered_model_name=model_name,
        metadata=extra_metadata,
        save_as_external_data=False,
    )
    version = str(info.registered_model_version)
    if alias:
        MlflowClient().set_registered_model_alias(model_name, alias, version)
    return version


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 500 else text[:497] + "..."
