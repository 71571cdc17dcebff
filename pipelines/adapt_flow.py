"""The adaptation job end to end: MLflow run → Ray Train job (style + IRB + pseudo-labels [+ adversarial]) →
evaluation → ONNX export + parity → registry. Used by `endoflow adapt train`; the job itself is training/adapt/."""

from __future__ import annotations

from pathlib import Path

from pipelines.segmenter_release import VariantResult, train_and_release
from training.adapt import train as adapt_train
from training.adapt.config import AdaptJobConfig
from training.data.sources import DataSpec


def train_and_export(
    cfg: AdaptJobConfig,
    eval_spec: DataSpec | None,
    out_dir: Path,
    register_as: tuple[str, str | None] | None = None,
    fresh: bool = False,
) -> VariantResult:
    """Train `cfg` (resuming a stopped run of the same name unless `fresh`), score on `eval_spec`, export, log."""
    return train_and_release(cfg, adapt_train.run, eval_spec, out_dir, register_as, fresh)
