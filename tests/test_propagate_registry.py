"""`endoflow propagate evaluate|pseudo-label` with models:/ refs: the three graphs `propagate train --register`
writes (NAME-encode_key, NAME-encode_value, NAME-segment) and a registered reference segmenter, resolved from a
sqlite MLflow registry; a tiny untrained export stands in for a trained model."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import onnx
import pytest
import torch
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.propagate_flow import locate_model
from serving.propagation_graphs import GRAPHS, graph_metadata
from training import tracking
from training.data.classes import IGNORE_INDEX
from training.data.folders import write_folder_dataset
from training.data.simulator import simulate_sequences
from training.data.sources import DataSpec, load_data
from training.export import export_segmenter
from training.models.propagation.network import PropagationConfig, PropagationNet
from training.models.unet import Segmenter, UNetConfig
from training.propagate.export import ExportedGraphs, export_propagation

SIZE = 64


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ExportedGraphs]:
    """A registry holding tiny@champion (the three graphs, version 1), tiny@half (segment missing), tiny@mixed
    (encode_key from another export) and seg@champion (a segmentation ONNX)."""
    root = tmp_path_factory.mktemp("registry")
    torch.manual_seed(0)
    small = PropagationConfig(key_dim=8, value_dim=16, c4=8, c8=16, c16=24, decoder_width=16)
    graphs = export_propagation(PropagationNet(small).eval(), root / "graphs", "tiny", SIZE, run_id="run-a")
    other = onnx.load(str(graphs["encode_key"]))
    onnx.helper.set_model_props(other, graph_metadata(graphs["encode_key"]) | {"endoflow.source_run_id": "run-b"})
    onnx.save(other, str(root / "other.encode_key.onnx"))
    segmenter = export_segmenter(Segmenter(UNetConfig(base_width=4, depth=2)), root / "seg.onnx", SIZE)

    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # register_onnx logs into the active run, as `propagate train --register` does
    try:
        experiment = mlflow.create_experiment("registry-test", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            for graph in GRAPHS:
                tracking.register_onnx(graphs[graph], f"tiny-{graph}", "champion")
            tracking.register_onnx(root / "other.encode_key.onnx", "tiny-encode_key", "mixed")
            tracking.register_onnx(segmenter, "seg", "champion")
        client = mlflow.MlflowClient(uri)
        for graph in GRAPHS:  # aliases are cheap; registering (logging) a model is not
            if graph != "segment":
                client.set_registered_model_alias(f"tiny-{graph}", "half", "1")
            if graph != "encode_key":
                client.set_registered_model_alias(f"tiny-{graph}", "mixed", "1")
    finally:
        mlflow.set_tracking_uri(previous)
    return uri, graphs


@pytest.fixture(scope="module")
def sequences_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sequences") / "data"
    frames, truth = simulate_sequences(2, 4, seed=3, style="real-like", size=SIZE)
    names = [f"seq{s}/{t:03d}" for s in range(2) for t in range(4)]
    write_folder_dataset(str(root), frames.reshape(-1, SIZE, SIZE, 3), truth.reshape(-1, SIZE, SIZE), names)
    return root


def test_registered_graphs_are_the_exported_ones(registry) -> None:
    uri, graphs = registry
    for ref in ("models:/tiny@champion", "models:/tiny/1"):
        located = locate_model(ref, uri)
        assert isinstance(located, ExportedGraphs)
        for graph in GRAPHS:
            assert graph_metadata(located[graph]) == graph_metadata(graphs[graph])

    with pytest.raises(FileNotFoundError, match="registered graph missing: models:/tiny-segment@half"):
        locate_model("models:/tiny@half", uri)
    with pytest.raises(FileNotFoundError, match="models:/tiny-encode_key@nope"):
        locate_model("models:/tiny@nope", uri)
    with pytest.raises(ValueError, match="different training runs"):
        locate_model("models:/tiny@mixed", uri)
    with pytest.raises(ValueError, match="expected models:/NAME@ALIAS or models:/NAME/VERSION"):
        locate_model("models:/tiny", uri)


def test_evaluate_cli_with_a_registry_ref(registry, sequences_dir: Path, tmp_path: Path) -> None:
    uri, graphs = registry
    common = ["--data", str(sequences_dir), "--layout", "folder", "--tracking-uri", uri]
    reports = {}
    for model in ("models:/tiny@champion", str(graphs["segment"].parent)):
        out = tmp_path / f"{len(reports)}.json"
        run = CliRunner().invoke(app, ["propagate", "evaluate", "--model", model, *common, "--out", str(out)])
        assert run.exit_code == 0, run.output
        reports[model] = json.loads(out.read_text())
    registered, local = reports.values()
    assert registered["model"] == "models:/tiny@champion" and registered["size"] == SIZE  # the graphs' input size
    assert registered["mean"] == local["mean"] and set(registered["sequences"]) == {"seq0", "seq1"}

    missing = CliRunner().invoke(app, ["propagate", "evaluate", "--model", "models:/tiny@half", *common])
    assert missing.exit_code == 2 and "models:/tiny-segment@half" in missing.output


def test_pseudo_label_cli_with_registry_refs(registry, sequences_dir: Path, tmp_path: Path) -> None:
    uri, _ = registry
    out = tmp_path / "pseudo"
    args = ["propagate", "pseudo-label", "--model", "models:/tiny@champion", "--segmenter", "models:/seg@champion"]
    args += ["--data", str(sequences_dir), "--layout", "folder", "--out", str(out), "--tracking-uri", uri]
    run = CliRunner().invoke(app, [*args, "--key-every", "2", "--min-kept", "0", "--threshold", "0.5"])
    assert run.exit_code == 0, run.output
    assert json.loads((out / "pseudo_labels.json").read_text())["frames_written"] == 8
    # The set it wrote trains as it is: ignored pixels come back as IGNORE_INDEX.
    images, masks = load_data(DataSpec(kind="folder", uri=str(out), size=SIZE))
    assert images.shape == (8, SIZE, SIZE, 3) and (masks == IGNORE_INDEX).any()

    bad = CliRunner().invoke(app, [*args[:5], "models:/absent@champion", *args[6:]])
    assert bad.exit_code == 2 and "models:/absent@champion" in bad.output
