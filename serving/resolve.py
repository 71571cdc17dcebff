"""Turn a model reference into a local `model.onnx` and a sha256 that identifies exactly what will be served.

A reference is one of:
  /path/to/model.onnx                   a file
  /path/to/dir                          a directory holding model.onnx (e.g. a downloaded MLflow model)
  models:/name@alias, models:/name/3    the MLflow registry; the tracking server comes from MLFLOW_TRACKING_URI
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

MODEL_FILE = "model.onnx"
_REGISTRY_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))$")


@dataclass(frozen=True)
class ResolvedModel:
    ref: str  # what the caller asked for
    name: str  # registered model name, or the file's stem for local paths
    path: Path  # the local .onnx file
    sha256: str  # of the .onnx file followed by its external-data files, so weights count too


def resolve_model(
    ref: str | Path, cache_dir: str | Path | None = None, tracking_uri: str | None = None
) -> ResolvedModel:
    """`tracking_uri` names the MLflow registry for models:/ refs (default: $MLFLOW_TRACKING_URI)."""
    ref = str(ref)
    if ref.startswith("models:/"):
        name, path = _download_registered(ref, cache_dir, tracking_uri)
    else:
        name, path = None, _local_model_file(Path(ref).expanduser())
    return ResolvedModel(ref=ref, name=name or path.stem, path=path, sha256=model_sha256(path))


def _local_model_file(path: Path) -> Path:
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.suffix != ".onnx":
        raise ValueError(f"expected an .onnx file or a directory holding {MODEL_FILE}, got {path}")
    return path.resolve()


def _download_registered(ref: str, cache_dir: str | Path | None, tracking_uri: str | None) -> tuple[str, Path]:
    match = _REGISTRY_REF.match(ref)
    if not match:
        raise ValueError(f"{ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    import mlflow  # only registry references pay for this import (a second or two)
    from mlflow.exceptions import MlflowException

    dst_path = None
    if cache_dir is not None:
        # One folder per reference, overwritten on each resolve: an alias may have moved since last time.
        dst_path = Path(cache_dir) / re.sub(r"[^A-Za-z0-9_.-]", "_", ref.removeprefix("models:/"))
        dst_path.mkdir(parents=True, exist_ok=True)
    # The registry is asked through a client with explicit URIs, never through process-wide settings: a replica
    # or test resolving against one server must not redirect every later MLflow call in the process (and
    # download_artifacts("models:/...") ignores its registry_uri argument in MLflow 3.17).
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if match["alias"]:
            version = client.get_model_version_by_alias(match["name"], match["alias"]).version
        else:
            version = match["version"]
        files_uri = client.get_model_version_download_uri(match["name"], version)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=files_uri, dst_path=dst_path and str(dst_path), tracking_uri=tracking_uri
        )
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise FileNotFoundError(f"{ref}: {err.message}") from err
        if err.error_code == "INVALID_PARAMETER_VALUE":  # what MLflow reports for an unknown alias
            raise ValueError(f"{ref}: {err.message}") from err
        raise
    path = Path(local) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{ref}: the registered model has no {MODEL_FILE} (is it an mlflow.onnx model?)")
    return match["name"], path.resolve()


def model_sha256(path: Path) -> str:
    """sha256 over the .onnx file and then each external-data file it names, in name order."""
    digest = hashlib.sha256()
    for file in [path, *_external_data_files(path)]:
        with open(file, "rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _external_data_files(path: Path) -> list[Path]:
    import onnx  # graph only: the tensors themselves are not read

    model = onnx.load(str(path), load_external_data=False)
    # Exporters (and mlflow.onnx.log_model, by default) put weights in top-level initializers.
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [path.parent / location for location in sorted(locations)]
