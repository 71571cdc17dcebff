"""The learned translator job's config: labelled sim source, unlabelled real target, generator size, loss weights.

Loss weights follow CUT (λ_GAN = 1, λ_NCE = 1) plus two content terms so the simulator labels stay valid:
- `structure`: L1 between the mean-normalised Sobel edge magnitudes of source and translation (geometry kept, while
  contrast and colour may change);
- `semantic`: cross-entropy of a frozen source-trained segmenter on the translation against the simulator label
  (needs `segmenter_checkpoint`; the adapt bench passes its source-only model).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from training.config import StrictModel
from training.data.sources import DataSpec
from training.loop import ComputeConfig
from training.models.translator import TranslatorConfig
from training.tracking import TrackingConfig

DEFAULT_TARGET = DataSpec(kind="sim", style="real-like", count=240, seed=1, size=128, labelled=False)


class TranslatorLossConfig(StrictModel):
    gan: float = Field(1.0, ge=0.0, description="LSGAN generator weight")
    nce: float = Field(1.0, ge=0.0, description="PatchNCE weight (CUT)")
    nce_patches: int = Field(64, ge=2, description="patches sampled per image and layer")
    nce_temperature: float = Field(0.07, gt=0.0)
    structure: float = Field(1.0, ge=0.0, description="edge-structure content weight")
    semantic: float = Field(0.5, ge=0.0, description="frozen-segmenter label consistency (with segmenter_checkpoint)")


class TranslatorJobConfig(StrictModel):
    name: str = Field("translator", description="Ray Train run name; the same name resumes")
    runs_dir: str = Field("runs", description="Ray storage path, MLflow store and outputs live under it")
    source: DataSpec = DataSpec(kind="sim", style="sim", count=240, seed=0, size=128)
    target: DataSpec = DEFAULT_TARGET
    model: TranslatorConfig = TranslatorConfig()
    loss: TranslatorLossConfig = TranslatorLossConfig()
    segmenter_checkpoint: str | None = Field(
        None, description="frozen source-trained segmenter for the semantic term: state.pt, checkpoint or run dir"
    )
    out: str | None = Field(None, description="exported generator file; default <runs_dir>/artifacts/<name>.pt")
    samples: int = Field(4, ge=1, le=16, description="rows of the per-epoch source | translated | real grid")
    compute: ComputeConfig = ComputeConfig(epochs=4, batch_size=4, lr=2e-4, weight_decay=0.0)
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("target", mode="before")
    @classmethod
    def _target_over_default(cls, value: object) -> object:
        # `--set target.count=8` keeps the other keys of the unlabelled default target, not DataSpec's labelled ones.
        return DEFAULT_TARGET.model_dump() | value if isinstance(value, dict) else value

    @property
    def generator_file(self) -> Path:
        return Path(self.out) if self.out else Path(self.runs_dir) / "artifacts" / f"{self.name}.pt"

    @model_validator(mode="after")
    def _consistent(self) -> TranslatorJobConfig:
        if not self.source.labelled and self.loss.semantic > 0 and self.segmenter_checkpoint:
            raise ValueError("loss.semantic needs labelled source frames (source.labelled: true)")
        if self.target.labelled:
            raise ValueError("target must be unlabelled (labelled: false): the translator never reads its labels")
        if self.source.size % self.model.size_multiple or self.target.size % self.model.size_multiple:
            raise ValueError(f"source.size and target.size must be multiples of {self.model.size_multiple}")
        return self
