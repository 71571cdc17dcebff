import json

import pytest
import torch

from pipelines.evaluate import evaluate_onnx
from training.data.folders import DataError, write_folder_dataset
from training.data.simulator import simulate_frames
from training.export import export_segmenter
from training.models.unet import Segmenter, UNetConfig


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    torch.manual_seed(0)
    return export_segmenter(
        Segmenter(UNetConfig(base_width=8, depth=2, blocks_per_level=1)).eval(),
        tmp_path_factory.mktemp("m") / "tiny.onnx",
        input_size=64,
    )


def test_evaluate_folder_dataset_writes_report_and_overlays(tiny_onnx, tmp_path):
    images, masks = simulate_frames(3, seed=5, style="real-like", size=64)
    write_folder_dataset(str(tmp_path / "data"), images, masks)
    report = evaluate_onnx(str(tiny_onnx), str(tmp_path / "data"), "folder", tmp_path / "out" / "report.json")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["data"]["frames"] == 3 and len(saved["model"]["sha256"]) == 64
    assert set(saved["dice"]) >= {"vocal_folds", "glottal_space"}
    assert 0.0 <= report["mean_dice"] <= 1.0
    assert (tmp_path / "out" / "report.overlays.png").stat().st_size > 0


def test_evaluate_rejects_unlabelled_data_and_unknown_layout(tiny_onnx, tmp_path):
    images, _ = simulate_frames(2, seed=5, style="real-like", size=64)
    write_folder_dataset(str(tmp_path / "unlabelled"), images, None)
    with pytest.raises(DataError, match="needs label masks"):
        evaluate_onnx(str(tiny_onnx), str(tmp_path / "unlabelled"), "folder", tmp_path / "r.json")
    with pytest.raises(ValueError, match="--layout"):
        evaluate_onnx(str(tiny_onnx), str(tmp_path), "nifti", tmp_path / "r.json")
