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

`endoflow bench adapt` ladder (pipelines/bench_adapt.py; 128 px, default model, 2 CPU workers; each adaptation rung
fine-tunes the source-only model for 3 epochs; machine shared, load average 9-52 on 2 cores), final mean Dice over the
7 classes (vocal folds + glottal space mean in brackets):
                      embedded (sim → real-like)   vocalfolds seq1-3 unlabelled → seq4 (Laves et al. 2019)
    source only        0.247 (0.368)               0.059 (0.053)
    FDA                0.729 (0.891)               0.190 (0.370)
    CUT translator     0.591 (0.681)               0.073 (0.022)   4 epochs only: 240 resp. 92 frames, CPU budget
    FDA + IRB          0.581 (0.795)               0.213 (0.469)
    + pseudo-labels    0.464 (0.686)               0.140 (0.178)
    oracle             0.763 (0.950)               0.338 (0.702)
    gap closed         0.93 (FDA)                  0.55 (FDA + IRB)
With these short budgets pseudo-labels (started at once, CBST 0.5) hurt on both targets, and the learned translator,
at a few hundred CPU steps, stays behind FDA; a real-like simulator source did not help on vocalfolds either
(FDA + IRB 0.096 vs 0.213). Longer training (10 source / 5 adaptation epochs) gave FDA 0.190 (0.367) and FDA + IRB
0.163 (0.334): on vocalfolds the run-to-run spread is as large as IRB's gain, so only FDA's is clearly real.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from training.config import StrictModel, absolute
from training.data.sources import DataSpec
from training.loop import ComputeConfig
from training.models.unet import UNetConfig
from training.segment.config import AugmentConfig
from training.style.transforms import STYLE_METHODS
from training.tracking import TrackingConfig

MC_DROPOUT_DEFAULT = 0.1  # dropout switched on for MC-dropout when the model config has none
DEFAULT_TARGET = DataSpec(kind="sim", style="real-like", count=240, seed=1, labelled=False)


class AdaptStyleConfig(StrictModel):
    method: Literal[STYLE_METHODS + ("translator",)] = Field(  # type: ignore[valid-type]
        "fda", description="sim→real transfer building the translated set: training-free, or a learned translator"
    )
    beta: float = Field(0.01, ge=0.0, le=0.5, description="FDA low-frequency window, fraction of the image side")
    translator: str | None = Field(None, description="generator file from `endoflow style train` (method=translator)")

    @model_validator(mode="after")
    def _translator_file(self) -> AdaptStyleConfig:
        if self.method == "translator" and not self.translator:
            raise ValueError("style.method=translator needs style.translator: the generator file of a translator run")
        self.translator = absolute(self.translator)
        return self


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
    extra_labelled: DataSpec | None = Field(
        None, description="labelled real frames (other patients) joining the source; never translated"
    )
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
        self.teacher_checkpoint = absolute(self.teacher_checkpoint)
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
        if self.extra_labelled is not None:
            if not self.extra_labelled.labelled:
                raise ValueError("extra_labelled must be labelled (labelled: true): its masks train the model")
            if self.extra_labelled.size != self.source.size:  # one batch shape: follow the source size
                self.extra_labelled = self.extra_labelled.model_copy(update={"size": self.source.size})
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


def extra_labelled_override(uri: str) -> str:
    """`--extra-labelled DIR` as a config override: vocalfolds layout when DIR has img/ and annot/, else folder."""
    import json

    from training.data import storage

    vocalfolds = storage.exists(storage.join(uri, "img")) and storage.exists(storage.join(uri, "annot"))
    return "extra_labelled=" + json.dumps({"kind": "vocalfolds" if vocalfolds else "folder", "uri": uri})
