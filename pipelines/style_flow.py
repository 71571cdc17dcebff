"""`endoflow style apply` / `style train`: write a translated simulator set, or train the learned translator.

apply: source frames (labelled, usually the simulator) → each translated toward the target domain with one method
→ images + the unchanged source labels written as a folder dataset (write_folder_dataset) to a directory or s3://
prefix. fda | lab | histogram | adain pair each source frame with a random target frame (adain also needs a local
weights file, never downloaded); translator needs only its generator file (`style train`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import torch
from pydantic import Field, model_validator

from training import tracking
from training.config import StrictModel
from training.data.folders import write_folder_dataset
from training.data.normalize import to_unit_bchw
from training.data.sources import DataSpec, load_data
from training.style.adain import AdaINConfig, load_adain
from training.style.generator_file import load_generator
from training.style.transforms import AnyStyleMethod, apply_style
from training.style.translator_config import DEFAULT_TARGET, TranslatorJobConfig

CHUNK = 16


class StyleApplyConfig(StrictModel):
    method: AnyStyleMethod = "fda"
    out: str = Field("runs/style/translated", description="output directory or s3:// prefix")
    source: DataSpec = DataSpec(kind="sim", style="sim", count=240, seed=0, size=256)
    target: DataSpec | None = Field(DEFAULT_TARGET, description="unlabelled target frames (the style to take on)")
    beta: float = Field(0.01, ge=0.0, le=0.5, description="FDA low-frequency window")
    translator: str | None = Field(None, description="generator file from `endoflow style train` (method=translator)")
    adain: AdaINConfig = AdaINConfig()
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> StyleApplyConfig:
        if self.method == "translator" and not self.translator:
            raise ValueError("method=translator needs 'translator': the generator file of `endoflow style train`")
        if self.method == "adain" and not self.adain.weights:
            raise ValueError("method=adain needs adain.weights: a local AdaINNet state dict (never downloaded)")
        if self.method not in ("none", "translator") and self.target is None:
            raise ValueError(f"method={self.method!r} needs a 'target' data section")
        if self.target is not None and self.target.labelled:
            self.target = self.target.model_copy(update={"labelled": False})  # its labels are never read
        return self


def apply_style_dataset(cfg: StyleApplyConfig, progress=print) -> dict:
    """Translate the source set and write it with its labels to `cfg.out`; returns a summary."""
    model = None
    if cfg.method == "translator":
        model = load_generator(cfg.translator, "translator")
    elif cfg.method == "adain":
        model = load_adain(cfg.adain)
    images, masks = load_data(cfg.source)
    if masks is None:
        raise ValueError(f"source {cfg.source.describe()} has no labels; a translated set keeps the source labels")
    target = None
    if cfg.target is not None and cfg.method not in ("none", "translator"):
        target = load_data(cfg.target.model_copy(update={"size": cfg.source.size}))[0]
    rng = np.random.default_rng(cfg.seed)
    out = np.empty_like(images)
    for start in range(0, len(images), CHUNK):
        batch = to_unit_bchw(images[start : start + CHUNK])
        paired = None if target is None else to_unit_bchw(target[rng.integers(len(target), size=len(batch))])
        styled = apply_style(cfg.method, batch, paired, cfg.beta, model=model, alpha=cfg.adain.alpha)
        out[start : start + CHUNK] = styled.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        progress(f"[style] {cfg.method}: {min(start + CHUNK, len(images))}/{len(images)} frames")
    write_folder_dataset(cfg.out, out, masks)
    return {"method": cfg.method, "frames": len(out), "size": cfg.source.size, "out": cfg.out}


def train_translator(cfg: TranslatorJobConfig, fresh: bool = False) -> tuple[Path, dict, str]:
    """One MLflow run around the translator Ray Train job; returns (generator file, last metrics, run id)."""
    from training.style import translator_train

    tracking_uri = tracking.use_tracking(cfg.tracking, cfg.runs_dir)
    if fresh:
        shutil.rmtree(Path(cfg.runs_dir) / "ray" / cfg.name, ignore_errors=True)
    with mlflow.start_run(run_name=cfg.name) as run:
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"run_id": run.info.run_id})})
        tracking.log_config(cfg)
        path, metrics = translator_train.run(cfg, tracking_uri)
        mlflow.log_artifact(str(path), artifact_path="generator")
        return path, metrics, run.info.run_id
