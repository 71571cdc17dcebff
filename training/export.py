"""ONNX export of the segmenter: one self-contained file with its serving contract in `metadata_props`.

The contract (read by `serving/`, which never imports torch): input `image` float32 (N, 3, H, W), RGB normalised as
(pixel/255 − mean)/std; output `logits` float32 (N, C, H, W); N dynamic, H and W dynamic multiples of
`endoflow.size_multiple`. A parity check runs the same inputs through torch and onnxruntime.
Raw uint8 RGB stays out of the graph on purpose: one input, one dtype, so float32 clients, the parity check and
evaluation keep working unchanged; serving/pixels.py normalises uint8 frames exactly as above (bit-identical to a
float32 client following it), and the v2 metadata says `image` also takes UINT8 [N, H, W, 3].
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.export import Dim

from training.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from training.models.encoders import encoder_provenance
from training.models.unet import Segmenter


class ParityError(RuntimeError):
    pass


@dataclass
class ParityReport:
    max_abs_diff: float
    label_agreement: float
    tolerance: float
    shapes: list[tuple[int, ...]]

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def segmentation_metadata(model: Segmenter, input_size: int, run_id: str | None) -> dict[str, str]:
    return {
        "endoflow.task": "segmentation",
        "endoflow.class_names": json.dumps(list(model.cfg.class_names)),
        "endoflow.input_size": json.dumps([input_size, input_size]),
        "endoflow.normalization": json.dumps({"mean": IMAGENET_MEAN, "std": IMAGENET_STD}),
        "endoflow.size_multiple": str(model.cfg.size_multiple),
        "endoflow.source_run_id": run_id or "",
        "endoflow.model_config": model.cfg.model_dump_json(),
        "endoflow.encoder": json.dumps(encoder_provenance(model.cfg.encoder)),
    }


def export_segmenter(model: Segmenter, path: Path, input_size: int = 256, run_id: str | None = None) -> Path:
    model = model.eval().cpu()
    multiple = model.cfg.size_multiple
    if input_size % multiple:
        raise ValueError(f"input_size {input_size} must be a multiple of {multiple} for this architecture")
    example = torch.zeros(2, 3, input_size, input_size)
    dynamic = {
        0: Dim("batch", min=1, max=256),
        2: multiple * Dim("h_blocks", min=1, max=128),
        3: multiple * Dim("w_blocks", min=1, max=128),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamo=True,
            dynamic_shapes={"image": dynamic},
            external_data=False,
            verbose=False,
        )
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in segmentation_metadata(model, input_size, run_id).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def check_parity(model: Segmenter, onnx_path: Path, images_nchw: torch.Tensor, tolerance: float = 1e-3) -> ParityReport:
    """Max |torch − onnxruntime| over the logits of `images_nchw` (already normalised) and of a resized batch."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model = model.eval().cpu()
    half = images_nchw[:1, :, ::2, ::2]  # a second spatial size exercises the dynamic axes
    worst, agree, total, shapes = 0.0, 0, 0, []
    for batch in (images_nchw, half):
        with torch.no_grad():
            expected = model(batch).numpy()
        got = session.run(["logits"], {"image": batch.numpy().astype(np.float32)})[0]
        worst = max(worst, float(np.abs(expected - got).max()))
        agree += int((expected.argmax(1) == got.argmax(1)).sum())
        total += expected.shape[0] * expected.shape[2] * expected.shape[3]
        shapes.append(tuple(batch.shape))
    report = ParityReport(worst, agree / total, tolerance, shapes)
    if not report.ok:
        raise ParityError(f"ONNX parity failed for {onnx_path}: max abs diff {worst:.2e} > tolerance {tolerance:.0e}")
    return report


class _quiet_exporter:
    """The exporter logs a page of registry warnings per call; keep the user's terminal readable."""

    def __enter__(self) -> None:
        self._level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("torch.onnx").setLevel(self._level)
