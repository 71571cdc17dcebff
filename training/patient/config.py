"""The patient job's config (`endoflow patient adapt`): a new patient's sequences and K labelled frames, the
propagation model and segmenter that turn them into pseudo-labels, and the fine-tuning that follows — one typed
object, so that `endoflow sweep` (job: patient) can sweep its thresholds like any other field.

Layouts of `data.frames`:
- vocalfolds: img/<patient>/<sequence>/<frame>.png (annot/ is not read: the labels come from `data.labels`);
- frames: one subfolder of frames per sequence (<sequence>/<frame>.png|jpg), or frames directly in the folder (one
  sequence, named after the folder). Frames are in file-name order.
- video: one video file per sequence (.mp4, .mkv, ...; training/data/video.py), named by its stem, all in the folder
  (not in subfolders), or `data.frames` one video file. A video's frames are named by their 0-based index, 000042.
`data.labels` mirrors the frames below their root (below img/ for vocalfolds): the label map of frame
<sequence>/<frame>.png is labels/<sequence>/<frame>.png (of a video's frame 42, labels/<video stem>/000042.png),
class indices 0..6 (training/data/classes.py), the frame's size. Only the frames with a label map are labelled;
each of them is a key frame that propagation starts from.

CT volumes, `data.layout: flare22` (the layout `propagate evaluate --layout flare22` reads and `propagate
simulate-ct` writes): data.frames is a root of imagesTr/<case>_0000.nii.gz, each volume a sequence, its axial slices
the frames, windowed as `propagate evaluate` windows them (uint8 grey RGB, size×size). The labelled slices come from
labelsTr/<case>.nii.gz under data.labels (default: data.frames, as FLARE22 ships): the slice(s) `data.key_slices`
names, by default the middle annotated one, as `propagate evaluate` gives it; the rest of that file is never read, so
a fully labelled FLARE22 case is the one-labelled-slice setting, and `annotated` takes every slice someone labelled.
Why not PNG label maps here: FLARE22 labels are NIfTI volumes, and picking slices of them is how the CT commands
already start. Values are organ labels, FLARE22 numbering (training/data/classes.py): the model's label set is
flare22 with that layout (model.num_classes, default 14, bounds the values). A volume without a labelsTr/ file is
left out. There is no simulator share with CT (sim_share 0), and a first CT patient often has no segmenter yet:
`pseudo.agreement: propagation` keeps pixels by the propagation's confidence alone.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from training.config import StrictModel, absolute
from training.data.sources import DataSpec
from training.loop import ComputeConfig
from training.models.propagation.network import KEY_STRIDE
from training.models.unet import UNetConfig
from training.propagate.inference import MemoryPolicy
from training.segment.config import AugmentConfig
from training.tracking import TrackingConfig


class PatientDataConfig(StrictModel):
    frames: str | None = Field(
        None, description="the patient's frames: a vocalfolds root, a folder of sequences, of videos, or one video"
    )
    layout: Literal["vocalfolds", "frames", "video", "flare22"] = "frames"
    sequences: list[str] | None = Field(None, description="sequences to use (default: all), e.g. [seq1, seq2]")
    labels: str | None = Field(None, description="label maps of the K labelled frames, mirroring the frames")
    key_slices: Literal["middle", "annotated"] | list[int] = Field(
        "middle", description="flare22: the labelled slices of every volume: middle, annotated, or indices"
    )

    @model_validator(mode="after")
    def _absolute(self) -> PatientDataConfig:
        if self.layout == "flare22" and self.labels is None:
            self.labels = self.frames  # FLARE22 ships labelsTr/ beside imagesTr/
        self.frames, self.labels = absolute(self.frames), absolute(self.labels)
        if isinstance(self.key_slices, list) and (not self.key_slices or min(self.key_slices) < 0):
            raise ValueError(f"key_slices {self.key_slices}: expected slice indices 0, 1, ... (at least one)")
        return self


class PatientPseudoConfig(StrictModel):
    """The pseudo-labels of `propagate pseudo-label` (training/propagate/pseudo_labels.py), started from the
    labelled frames: a pixel is kept where propagation and the segmenter agree with mutual uncertainty ≤
    threshold (agreement: segmenter), or, with no segmenter needed, where the propagation's own confidence is
    ≥ 1 − threshold (agreement: propagation); a frame is written when at least min_kept of it is kept."""

    enabled: bool = Field(True, description="false: train on the K labelled frames alone (no propagation)")
    threshold: float = Field(0.3, ge=0, lt=1, description="largest mutual-agreement uncertainty of a kept pixel")
    min_kept: float = Field(0.5, ge=0, le=1, description="a frame is written only if this fraction is kept")
    agreement: Literal["segmenter", "propagation"] = Field(
        "segmenter", description="what keeps a pixel: agreement with the segmenter, or propagation confidence alone"
    )
    memory: MemoryPolicy = MemoryPolicy()


class PatientJobConfig(StrictModel):
    name: str = Field("patient", description="Ray Train run name of the fine-tuning; the same name resumes")
    runs_dir: str = Field("runs", description="Ray storage, MLflow store, the pseudo-labelled set and outputs")
    data: PatientDataConfig = PatientDataConfig()
    size: int = Field(256, ge=32, description="frames are resized to size×size for propagation and training")
    propagation_model: str | None = Field(
        None, description="a propagation checkpoint .pt, its ONNX graphs, or models:/NAME@ALIAS"
    )
    segmenter: str | None = Field(
        None, description="the current segmenter: segmentation ONNX or models:/NAME@ALIAS (agreement, overlays)"
    )
    init_checkpoint: str | None = Field(
        None, description="segment/adapt checkpoint (state.pt, checkpoint or Ray run dir) to fine-tune from"
    )
    pseudo: PatientPseudoConfig = PatientPseudoConfig()
    labelled_copies: int = Field(
        4, ge=1, description="each labelled frame enters the training set this many times, beside its pseudo-labels"
    )
    sim_share: float = Field(0.0, ge=0, lt=1, description="share of simulator frames in the training set")
    sim_style: Literal["sim", "real-like"] = "real-like"
    sim_seed: int = 0
    val: DataSpec | None = Field(None, description="labelled frames scored every epoch (a sweep's metric)")
    augment: AugmentConfig = AugmentConfig()
    model: UNetConfig = UNetConfig()
    compute: ComputeConfig = ComputeConfig(epochs=10)
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _organs_for_volumes(cls, values: object) -> object:
        """CT volumes are labelled with organs: layout flare22 sets model.label_set unless the recipe names one."""
        if not isinstance(values, dict):
            return values
        data, model = values.get("data"), values.get("model", {})
        layout = data.get("layout") if isinstance(data, dict) else getattr(data, "layout", None)
        if layout == "flare22" and isinstance(model, dict) and "label_set" not in model:
            return {**values, "model": {**model, "label_set": "flare22"}}
        return values

    @model_validator(mode="after")
    def _consistent(self) -> PatientJobConfig:
        self.propagation_model, self.segmenter = absolute(self.propagation_model), absolute(self.segmenter)
        self.init_checkpoint = absolute(self.init_checkpoint)
        for multiple in (self.model.size_multiple, KEY_STRIDE):  # the segmenter's and the propagation net's
            if self.size % multiple:
                raise ValueError(f"size {self.size} must be a multiple of {multiple}")
        if self.val is not None and not self.val.labelled:
            raise ValueError("val must be labelled: it is scored every epoch")
        volumes = self.data.layout == "flare22"
        if volumes != (self.model.label_set == "flare22"):
            expected = "flare22" if volumes else "laryngoscopy"
            raise ValueError(f"data.layout {self.data.layout} needs model.label_set {expected}")
        if volumes and self.sim_share:
            raise ValueError("sim_share must be 0 with data.layout flare22: simulator frames are not CT slices")
        return self

    def missing_inputs(self) -> list[str]:
        """What a run needs that this config does not name (a recipe may leave them to the command line)."""
        needed = {
            "data.frames": self.data.frames,
            "data.labels": self.data.labels,
            "propagation_model": self.propagation_model if self.pseudo.enabled else "unused",
            "segmenter (or pseudo.agreement=propagation)": self.segmenter
            if self.pseudo.enabled and self.pseudo.agreement == "segmenter"
            else "unused",
        }
        return [key for key, value in needed.items() if not value]
