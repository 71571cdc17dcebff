"""The segmentation job's config: data, style transfer, model, compute, tracking — one typed object."""

from __future__ import annotations

from pydantic import Field, model_validator

from training.config import StrictModel
from training.data.sources import DataSpec
from training.loop import ComputeConfig
from training.models.unet import UNetConfig
from training.style.transforms import StyleMethod
from training.tracking import TrackingConfig


class StyleConfig(StrictModel):
    method: StyleMethod = Field("none", description="training-free sim→real transfer applied per batch")
    beta: float = Field(0.01, ge=0.0, le=0.5, description="FDA low-frequency window, fraction of the image side")
    probability: float = Field(1.0, ge=0.0, le=1.0, description="fraction of source images that are translated")


class AugmentConfig(StrictModel):
    hflip: bool = True
    brightness: float = Field(0.1, ge=0.0, le=1.0, description="± relative brightness jitter")
    contrast: float = Field(0.1, ge=0.0, le=1.0, description="± relative contrast jitter")


class SegmentJobConfig(StrictModel):
    name: str = Field("segment", description="Ray Train run name; the same name resumes")
    runs_dir: str = Field("runs", description="Ray storage path, MLflow store and outputs live under it")
    source: DataSpec = DataSpec(kind="sim", style="sim", count=480, seed=0)
    target: DataSpec | None = Field(None, description="unlabelled target-domain images (style transfer)")
    val: DataSpec | None = Field(None, description="labelled target validation frames, scored every epoch")
    style: StyleConfig = StyleConfig()
    augment: AugmentConfig = AugmentConfig()
    model: UNetConfig = UNetConfig()
    compute: ComputeConfig = ComputeConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _style_needs_target(self) -> SegmentJobConfig:
        if self.style.method != "none" and self.target is None:
            raise ValueError(f"style.method={self.style.method!r} needs a 'target' data section (unlabelled images)")
        if self.source.size % self.model.size_multiple:
            raise ValueError(f"source.size {self.source.size} must be a multiple of {self.model.size_multiple}")
        return self
