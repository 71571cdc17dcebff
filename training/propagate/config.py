"""The propagation job's config: data, deformation, model, memory policy, compute, tracking — one typed object."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from training.config import StrictModel
from training.data.sources import DataSpec
from training.loop import ComputeConfig
from training.models.propagation.network import PropagationConfig
from training.propagate.inference import MemoryPolicy
from training.tracking import TrackingConfig


class ClipDataConfig(StrictModel):
    """Where training clips come from. Stage 1 uses the static images (sim frames + `real` frames), stage 2 mixes
    sequences (sim sequences + `real` sequences in time order) with a share of static pseudo-sequences."""

    size: int = Field(256, ge=32, description="clips are size×size; a multiple of 16")
    sim_frames: int = Field(320, ge=0, description="simulated static frames (half sim, half real-like style)")
    sim_sequences: int = Field(24, ge=0, description="simulated sequences (real-like style)")
    sim_length: int = Field(24, ge=3, description="frames per simulated sequence")
    sim_seed: int = 0
    sim_style: Literal["sim", "real-like", "mixed"] = "mixed"
    sim_volumes: int = Field(0, ge=0, description="simulated CT volumes whose axial slices join the sim pool")
    real: DataSpec | None = Field(None, description="labelled real frames (vocalfolds or folder), never the eval set")
    clip_frames: int = Field(3, ge=2, description="frames per clip: the first is given, the rest are predicted")
    max_objects: int = Field(3, ge=1, description="objects per clip, drawn from the classes of its first frame")
    sim_max_gap: int = Field(6, ge=1, description="largest step between clip frames in a simulated sequence")
    real_max_gap: int = Field(2, ge=1, description="largest step between labelled real frames in a clip")
    static_share: float = Field(0.3, ge=0, le=1, description="stage 2: fraction of clips still drawn from statics")
    real_share: float = Field(0.4, ge=0, le=1, description="fraction of clips drawn from `real` (when given)")


class DeformConfig(StrictModel):
    """Random affine + elastic deformations that turn one image into a pseudo-sequence (stage 1). Stage 2 applies
    `sequence_strength` times these to real sequences' frames."""

    rotation_deg: float = Field(35.0, ge=0)
    scale_min: float = Field(0.7, gt=0)
    scale_max: float = Field(1.4, gt=0)
    translate: float = Field(0.2, ge=0, description="fraction of the side")
    shear_deg: float = Field(10.0, ge=0)
    elastic: float = Field(0.06, ge=0, description="amplitude of the smooth displacement field, fraction of the side")
    brightness: float = Field(0.15, ge=0)
    contrast: float = Field(0.15, ge=0)
    colour: float = Field(
        0.0, ge=0, lt=1, description="± per-channel gain (a colour cast, as white balance drifts); 0 = off"
    )
    gamma: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="exposure curve: intensities raised to a power in [1/(1+g), 1+g] (shadows lifted or deepened, "
        "as auto-exposure does between frames); 0 = off",
    )
    sequence_strength: float = Field(0.3, ge=0, le=1)


class PropagateComputeConfig(ComputeConfig):
    """The shared compute section with this job's defaults (they must hold when only some keys are overridden)."""

    epochs: int = Field(8, ge=1)
    batch_size: int = Field(4, ge=1, description="clips per worker")
    workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel replicas)")
    cpus_per_worker: int = Field(2, ge=1, description="also the torch thread count of each worker")


class PropagateJobConfig(StrictModel):
    name: str = Field("propagate", description="Ray Train run name; the same name resumes")
    runs_dir: str = Field("runs", description="Ray storage path, MLflow store and outputs live under it")
    data: ClipDataConfig = ClipDataConfig()
    deform: DeformConfig = DeformConfig()
    stage1_epochs: int = Field(3, ge=0, description="the first epochs train on static pseudo-sequences only")
    steps_per_epoch: int = Field(100, ge=1, description="clip batches per epoch and worker")
    bn_recalibration_batches: int = Field(
        40,
        ge=0,
        description="after each epoch, batch-norm statistics averaged over this many batches (at most "
        "steps_per_epoch; 0 = keep the running estimates)",
    )
    weight_average_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="exponential moving average of the weights at this decay per step: what is evaluated, "
        "checkpointed and exported (its batch-norm statistics recomputed); None = the trained weights",
    )
    weight_average_from_epoch: int | None = Field(
        None,
        ge=1,
        description="uniform average of the weights after every step from this epoch (1-based) on, as in SWA: "
        "what is evaluated, checkpointed and exported from then on; None = no uniform average",
    )
    val: DataSpec | None = Field(None, description="labelled sequences scored by J&F (first frame given) each epoch")
    model: PropagationConfig = PropagationConfig()
    memory: MemoryPolicy = MemoryPolicy()
    compute: PropagateComputeConfig = PropagateComputeConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _check(self) -> PropagateJobConfig:
        if self.data.size % self.model.size_multiple:
            raise ValueError(f"data.size {self.data.size} must be a multiple of {self.model.size_multiple}")
        if self.weight_average_decay is not None and self.weight_average_from_epoch is not None:
            raise ValueError("set weight_average_decay (moving) or weight_average_from_epoch (uniform), not both")
        if self.weight_average_from_epoch is not None and self.weight_average_from_epoch > self.compute.epochs:
            raise ValueError(
                f"weight_average_from_epoch {self.weight_average_from_epoch} is after the last epoch "
                f"(compute.epochs {self.compute.epochs})"
            )
        if self.deform.scale_min > self.deform.scale_max:
            raise ValueError("deform.scale_min must not exceed deform.scale_max")
        if self.data.sim_frames == 0 and self.data.sim_volumes == 0 and self.data.real is None:
            raise ValueError("no static images: set data.sim_frames or data.sim_volumes > 0, or a data.real section")
        return self
