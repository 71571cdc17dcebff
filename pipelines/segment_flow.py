"""One segmentation variant end to end: MLflow run → Ray Train job → evaluation → ONNX export + parity → registry.

Used by `endoflow segment train`, the demo (once per variant) and the benchmarks; model, loss and data code live in
`training/`.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.segmenter_release import VariantResult, train_and_release
from training.data.sources import DataSpec
from training.segment import train as segment_train
from training.segment.config import SegmentJobConfig


def train_and_export(
    cfg: SegmentJobConfig,
    eval_spec: DataSpec | None,
    out_dir: Path,
    register_as: tuple[str, str | None] | None = None,
    fresh: bool = False,
) -> VariantResult:
    """Train `cfg` (resuming a stopped run of the same name unless `fresh`), score on `eval_spec`, export, log."""
    return train_and_release(cfg, segment_train.run, eval_spec, out_dir, register_as, fresh)
