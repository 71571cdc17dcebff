"""MLflow with PostgreSQL and S3 (pipelines/mlflow_stack.py), and s3:// end to end against it.

One `endoflow segment train` (in a subprocess with its own private Ray, so its workers get the S3 settings in their
environment) reads its dataset from s3://, checkpoints through Ray Train to s3://, logs to the tracking server
(PostgreSQL) and registers the ONNX model, whose artifact lands in the S3 artifact bucket. Serving then resolves
models:/name@alias with only MLFLOW_TRACKING_URI: the server proxies the artifact, no S3 keys needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.mlflow_stack import ARTIFACT_BUCKET, DATA_BUCKET, MlflowStack, StackError

ROOT = Path(__file__).resolve().parents[1]
MODEL = "endoflow-stack-test"


@pytest.fixture(scope="module")
def stack():
    try:
        with MlflowStack() as running:
            yield running
    except StackError as error:
        pytest.skip(f"the MLflow stack cannot start here: {error}")


@pytest.mark.slow
def test_s3_training_registration_and_serving_resolution(stack: MlflowStack, tmp_path: Path, monkeypatch) -> None:
    import mlflow
    import onnx
    import onnxruntime as ort

    from serving.resolve import resolve_model
    from training.data import storage
    from training.data.folders import write_folder_dataset
    from training.data.simulator import simulate_frames

    for key, value in stack.s3_env.items():
        monkeypatch.setenv(key, value)
    dataset = f"s3://{DATA_BUCKET}/datasets/tiny"
    images, masks = simulate_frames(12, seed=3, style="sim", size=64)
    write_folder_dataset(dataset, images, masks)

    runs_dir = f"s3://{DATA_BUCKET}/runs"
    job = {
        "name": "stack-s3",
        "runs_dir": runs_dir,
        "source": {"kind": "folder", "uri": dataset, "size": 64},
        "model": {"base_width": 4, "depth": 2},
        "compute": {"epochs": 1, "workers": 1, "batch_size": 4},
    }
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | stack.env()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "segment",
            "train",
            "-c",
            str(config),
            "--register",
            f"{MODEL}@champion",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    # Ray Train wrote its checkpoint to S3, not to a local folder.
    checkpoints = storage.list_files(f"{runs_dir}/ray/stack-s3")
    assert any("/checkpoint_" in uri and uri.endswith("/state.pt") for uri in checkpoints), checkpoints
    # The exported ONNX and overlays were copied under the s3:// runs_dir, and nothing landed in a local "s3:" folder.
    assert f"{runs_dir}/artifacts/stack-s3.onnx" in storage.list_files(f"{runs_dir}/artifacts")
    assert not (tmp_path / "s3:").exists()

    # The registry is in PostgreSQL; the registered model's files are in the S3 artifact bucket.
    client = mlflow.tracking.MlflowClient(stack.tracking_uri)
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert stack.database_uri.startswith("postgresql")
    stored = storage.list_files(f"s3://{ARTIFACT_BUCKET}/artifacts")
    assert any(uri.endswith("/model.onnx") for uri in stored), stored

    # Serving side: no S3 settings at all, only the tracking server.
    for key in stack.s3_env:
        monkeypatch.delenv(key)
    resolved = resolve_model(f"models:/{MODEL}@champion", cache_dir=tmp_path / "cache", tracking_uri=stack.tracking_uri)
    assert resolved.name == MODEL
    metadata = {p.key: p.value for p in onnx.load(str(resolved.path)).metadata_props}
    assert metadata["endoflow.source_run_id"] == version.run_id
    session = ort.InferenceSession(str(resolved.path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": np.zeros((1, 3, 64, 64), np.float32)})[0]
    assert logits.shape == (1, 7, 64, 64)
