"""The demo pipeline end to end on tiny data: Ray Train → export → MLflow registry → Ray Serve → HTTP."""

import json

import pytest

from pipelines.demo import DemoConfig, run_demo
from pipelines.local_ray import free_port

pytestmark = pytest.mark.slow


def test_tiny_demo_writes_report(ray_session, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    demo = DemoConfig(
        runs_dir=str(tmp_path / "demo"),
        size=64,
        source_count=16,
        target_count=8,
        eval_count=8,
        epochs=1,
        requests=4,
        stream_frames=3,
        port=free_port(),
    )
    report = run_demo(demo)
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["registered"]["model"] == "models:/endoflow-segmenter@champion"
    assert set(saved["variants"]) == {"source-only", "fda"}
    for variant in saved["variants"].values():
        assert variant["onnx_parity_max_abs_diff"] < 1e-3
        assert 0.0 <= variant["mean_dice"] <= 1.0
    assert saved["serving"]["requests"] == 4
    assert saved["serving"]["bad_request_status"] in (400, 415)
    assert "error" in saved["serving"]["bad_request_body"]
    # The served model is the registered one: over HTTP it labels pixels as the torch model did.
    assert saved["serving"]["served_vs_torch_pixel_agreement"] > 0.99
    stream = saved["serving"]["propagation"]  # an untrained network, served beside the segmenter
    assert stream["trained"] is False and stream["frames"] == 3 and stream["frames_per_second"] > 0
    assert (tmp_path / "demo" / "overlays.png").stat().st_size > 0
    assert (tmp_path / "demo" / "mlflow.db").exists()
    assert report["wall_seconds"] > 0
