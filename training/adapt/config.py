"""The adaptation job's config: labelled sim source, unlabelled target, and the rungs of the adaptation ladder
(style transfer → IoU-Ranking Blend → pseudo-labels → output-space adversarial) — one typed object.

Epochs count from 0. Without `teacher_checkpoint` the first `teacher_epochs` of `compute.epochs` train a source-only
teacher (the model IRB and the first pseudo-labels need); adaptation runs in the epochs after it.

Defaults are the highest rung that paid for itself in a small ladder: 320 sim frames → vocalfolds seq1-3 as the
unlabelled target, seq4 scored; 128 px, 8 epochs (2 teacher), 2 CPU workers, default model. Final seq4 mean Dice,
seed 0 / seed 1:
    source only      0.049 / -
    FDA              0.190 / 0.123
    + IRB            0.213 / 0.147   (k = r = 0.5)
    + pseudo-labels  0.232 / 0.154   (CBST 0.5, τ 0.9)
    + adversarial    0.232 / 0.158
FDA, IRB and pseudo-labels each help on both seeds; the adversarial term adds ≤ 0.005 (well inside the seed spread)
for a second network and optimiser, so it stays off.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from training.config import StrictModel
from training.data.sources import DataSpec
from training.loop import ComputeConfig
from training.models.unet import UNetConfig
from training.segment.config import AugmentConfig
from training.style.transforms import StyleMethod
from training.tracking import TrackingConfig

MC_DROPOUT_DEFAULT = 0.1  # dropout switched on for MC-dropout when the model config has none
DEFAULT_TARGET = DataSpec(kind="sim", style="real-like", count=240, seed=1, labelled=False)


class AdaptStyleConfig(StrictModel):
    method: StyleMethod = Field("fda", description="training-free sim→real transfer building the translated set")
    beta: float = Field(0.01, ge=0.0, le=0.5, description="FDA low-frequency window, fraction of the image side")


class IRBConfig(StrictModel):
    enabled: bool = True
    top_fraction: float = Field(0.5, gt=0.0, le=1.0, description="k: best-IoU fraction of translated images kept")
    translated_ratio: float = Field(0.5, ge=0.0, le=1.0, description="r: share of the mix drawn from kept ones")


class PseudoConfig(StrictModel):
    enabled: bool = True
    tau: float = Field(0.9, gt=0.0, le=1.0, description="confidence threshold (the per-class cap with CBST)")
    class_balanced: float | None = Field(
        0.5, gt=0.0, le=1.0, description="CBST: keep this fraction of each predicted class (None: one global τ)"
    )
    u_max: float = Field(0.5, gt=0.0, description="max MC-dropout predictive entropy (nats) of a kept pixel")
    uncertainty: Literal["none", "mc_dropout"] = "none"
    mc_passes: int = Field(4, ge=2, description="stochastic passes with uncertainty=mc_dropout")
    weight: float = Field(1.0, ge=0.0, description="pseudo-label cross-entropy weight")
    start_epoch: int | None = Field(None, ge=0, description="first epoch with pseudo-labels; None: after the teacher")


class AdversarialConfig(StrictModel):
    enabled: bool = False  # off by default: no measurable gain in the ladder above (module docstring)
    weight: float = Field(1e-3, ge=0.0, description="λ_adv (AdaptSegNet's single-level value)")
    lr: float = Field(1e-4, gt=0.0, description="discriminator Adam learning rate")
    width: int = Field(32, ge=4, description="discriminator channels at its first level")


class AdaptJobConfig(StrictModel):
    name: str = Field("adapt", description="Ray Train run name; the same name resumes")
    runs_dir: str = Field("runs", description="Ray storage path, MLflow store and outputs live under it")
    source: DataSpec = DataSpec(kind="sim", style="sim", count=480, seed=0)
    target: DataSpec | None = Field(DEFAULT_TARGET, description="unlabelled target-domain images (labelled: false)")
    val: DataSpec | None = Field(None, description="labelled target validation frames, scored every epoch")
    style: AdaptStyleConfig = AdaptStyleConfig()
    augment: AugmentConfig = AugmentConfig()
    irb: IRBConfig = IRBConfig()
    pseudo: PseudoConfig = PseudoConfig()
    adversarial: AdversarialConfig = AdversarialConfig()
    teacher_checkpoint: str | None = Field(
        None, description="state.pt, a checkpoint dir, or a Ray run dir of an earlier segment/adapt run"
    )
    teacher_epochs: int = Field(2, ge=0, description="source-only epochs first, when there is no teacher_checkpoint")
    model: UNetConfig = UNetConfig()
    compute: ComputeConfig = ComputeConfig(epochs=8)
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("target", mode="before")
    @classmethod
    def _target_over_default(cls, value: object) -> object:
        # A partial section (`--set target.count=64`) fills its other keys from the default unlabelled real-like
        # target, not from DataSpec's labelled sim defaults, which could never be a valid target here.
        return DEFAULT_TARGET.model_dump() | value if isinstance(value, dict) else value

    @property
    def teacher_phase(self) -> int:
        """Epochs of source-only teacher training inside this job."""
        return 0 if self.teacher_checkpoint else self.teacher_epochs

    @property
    def pseudo_start(self) -> int:
        return self.teacher_phase if self.pseudo.start_epoch is None else self.pseudo.start_epoch

    @model_validator(mode="after")
    def _consistent(self) -> AdaptJobConfig:
        for part, on in [
            (f"style.method={self.style.method!r}", self.style.method != "none"),
            ("pseudo.enabled", self.pseudo.enabled),
            ("adversarial.enabled", self.adversarial.enabled),
        ]:
            if on and self.target is None:
                raise ValueError(f"{part} needs a 'target' data section (unlabelled target images)")
        if self.target is not None:
            if self.target.labelled:
                raise ValueError("target must be unlabelled (labelled: false); put labelled target frames in 'val'")
            if self.target.size != self.source.size:
                raise ValueError(f"target.size {self.target.size} must equal source.size {self.source.size}")
        if self.val is not None and not self.val.labelled:
            raise ValueError("val must be labelled: it is scored every epoch")
        if self.source.size % self.model.size_multiple:
            raise ValueError(f"source.size {self.source.size} must be a multiple of {self.model.size_multiple}")
        if self.irb.enabled and self.style.method == "none":
            raise ValueError("irb.enabled ranks translated images, so it needs a style.method other than 'none'")
        if (self.irb.enabled or self.pseudo.enabled) and not self.teacher_checkpoint and self.teacher_epochs == 0:
            raise ValueError("IRB and pseudo-labels need a teacher: set teacher_checkpoint or teacher_epochs >= 1")
        if self.pseudo.enabled and self.pseudo_start < self.teacher_phase:
            raise ValueError(
                f"pseudo.start_epoch {self.pseudo_start} falls in the source-only teacher phase "
                f"(epochs 0..{self.teacher_phase - 1}); use {self.teacher_phase} or later"
            )
        if self.teacher_phase >= self.compute.epochs:
            raise ValueError(
                f"compute.epochs {self.compute.epochs} leaves no adaptation epoch after teacher_epochs "
                f"{self.teacher_phase}; raise compute.epochs or lower teacher_epochs"
            )
        # MC-dropout needs dropout layers; switch them on rather than fail deep inside a worker.
        if self.pseudo.enabled and self.pseudo.uncertainty == "mc_dropout" and self.model.dropout == 0:
            self.model = self.model.model_copy(update={"dropout": MC_DROPOUT_DEFAULT})
        return self
