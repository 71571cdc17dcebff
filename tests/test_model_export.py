import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from training.export import ParityError, check_parity, export_segmenter
from training.models.unet import Segmenter, UNetConfig, count_parameters
from training.style.fourier import fourier_style_transfer


def test_plain_unet_matches_the_reference_size():
    assert 7.7e6 < count_parameters(Segmenter(UNetConfig.plain())) < 7.95e6


@pytest.mark.parametrize("cfg", [UNetConfig(), UNetConfig(base_width=8, depth=3, block="double_conv", stem_stride=1)])
def test_segmenter_keeps_input_size(cfg):
    logits = Segmenter(cfg)(torch.zeros(2, 3, 64, 96))
    assert logits.shape == (2, 7, 64, 96)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = Segmenter(UNetConfig(base_width=8, depth=3)).eval()
    path = export_segmenter(model, tmp_path_factory.mktemp("onnx") / "seg.onnx", input_size=64, run_id="run123")
    return model, path


def test_export_is_self_contained_with_metadata(exported):
    _, path = exported
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["endoflow.task"] == "segmentation"
    assert json.loads(meta["endoflow.class_names"])[1] == "vocal_folds"
    assert json.loads(meta["endoflow.input_size"]) == [64, 64]
    assert meta["endoflow.source_run_id"] == "run123"
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert not list(path.parent.glob("*.data"))


def test_dynamic_batch_and_spatial_size(exported):
    _, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 64, 64), (3, 3, 32, 96)]:
        out = session.run(None, {"image": np.zeros(shape, np.float32)})[0]
        assert out.shape == (shape[0], 7, shape[2], shape[3])


def test_parity_passes_and_fails_on_a_different_model(exported):
    model, path = exported
    images = torch.randn(2, 3, 64, 64)
    report = check_parity(model, path, images)
    assert report.max_abs_diff < 1e-4 and report.label_agreement > 0.999
    other = Segmenter(UNetConfig(base_width=8, depth=3)).eval()
    with pytest.raises(ParityError, match="max abs diff"):
        check_parity(other, path, images)


def test_fda_keeps_structure_and_takes_target_low_frequencies():
    torch.manual_seed(0)
    source = torch.rand(2, 3, 64, 64) * 0.5 + 0.25
    target = torch.full((2, 3, 64, 64), 0.1)
    out = fourier_style_transfer(source, target, beta=0.05)
    assert out.shape == source.shape
    assert abs(out.mean().item() - 0.1) < abs(source.mean().item() - 0.1)  # DC amplitude now the target's
    assert torch.equal(fourier_style_transfer(source, target, beta=0.0), source)
    with pytest.raises(ValueError, match="equal image sizes"):
        fourier_style_transfer(source, target[..., :32])
