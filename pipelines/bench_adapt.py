"""`endoflow bench adapt`: the sim → real adaptation ladder, each rung scored on the same held-out real frames.

Rungs, in order (each adaptation rung fine-tunes from the source-only model, which is also its frozen teacher):
    source_only    segment job on simulator frames only
    fda            + training-free style transfer (FDA) toward the unlabelled target frames
    translator     + the learned CUT translator (trained here first, with the source-only model as its frozen
                     semantic-consistency segmenter) instead of FDA
    irb            FDA (or the translator, with `irb_style: translator`) + IoU-Ranking Blend
    irb_pseudo     + class-balanced pseudo-labels on the target frames (+ adversarial with `adversarial: true`)
    oracle         segment job on the target's labelled training frames — the only rung that reads target labels
gap closed = (best adapted − source_only) / (oracle − source_only), on mean Dice.

Targets: vocalfolds (Laves et al., IJCARS 2019, CC BY 4.0) train sequences as unlabelled target, eval sequences
scored; without real data, the embedded simulator's real-like renderer (unlabelled seed-1 frames as target, labelled
held-out seed-2000 frames scored, labelled seed-1 frames for the oracle).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from training.adapt import train as adapt_train
from training.adapt.config import AdaptJobConfig, AdaptStyleConfig, AdversarialConfig, IRBConfig, PseudoConfig
from training.config import StrictModel
from training.data.classes import GLOTTAL_SPACE, VOCAL_FOLDS
from training.data.sources import DataSpec, load_data
from training.loop import ComputeConfig
from training.metrics import vocal_folds_glottal_dice
from training.models.encoders import encoder_provenance
from training.models.translator import TranslatorConfig
from training.models.unet import UNetConfig
from training.segment import train as segment_train
from training.segment.config import SegmentJobConfig
from training.segment.predict import score
from training.style.translator_config import TranslatorJobConfig
from training.tracking import TrackingConfig

RUNGS = ("source_only", "fda", "translator", "irb", "irb_pseudo", "oracle")
ADAPTED = ("fda", "translator", "irb", "irb_pseudo")


class BenchAdaptConfig(StrictModel):
    real_data: str | None = Field(None, description="real target root; None: the embedded real-like simulator")
    real_layout: Literal["vocalfolds"] = Field("vocalfolds", description="sequences split train/eval")
    train_sequences: list[str] = Field(["seq1", "seq2", "seq3"], description="unlabelled target (labelled: oracle)")
    eval_sequences: list[str] = Field(["seq4"], description="scored, never trained on")
    size: int = Field(128, ge=32)
    source_style: Literal["sim", "real-like"] = Field("sim", description="simulator renderer of the labelled source")
    source_count: int = Field(320, ge=4)
    target_count: int = Field(240, ge=4, description="embedded target frames (unlabelled; labelled for the oracle)")
    eval_count: int = Field(96, ge=4, description="embedded held-out labelled frames")
    source_epochs: int = Field(6, ge=1, description="source-only and oracle epochs")
    adapt_epochs: int = Field(3, ge=1, description="epochs of each adaptation rung (fine-tuning the source model)")
    translator_epochs: int = Field(4, ge=1)
    translator: TranslatorConfig = TranslatorConfig()
    irb_style: Literal["translator", "fda"] = Field(
        "fda", description="the style under the IRB rungs (FDA: the better rung in the embedded ladder)"
    )
    fda_beta: float = Field(0.01, ge=0.0, le=0.5, description="FDA low-frequency window (fraction of the side)")
    adversarial: bool = False
    model: UNetConfig = UNetConfig()
    workers: int = Field(2, ge=1)
    batch_size: int = Field(4, ge=1)
    rungs: list[Literal[RUNGS]] = Field(list(RUNGS))  # type: ignore[valid-type]
    name: str = "bench-adapt"
    runs_dir: str = "runs/bench/adapt"


@dataclass
class Plan:
    """What every rung trains on and where its outputs land; built before anything runs."""

    source: DataSpec
    target: DataSpec
    oracle_train: DataSpec
    evaluate: DataSpec
    description: str
    jobs: dict[str, SegmentJobConfig | AdaptJobConfig | TranslatorJobConfig]


def plan(cfg: BenchAdaptConfig) -> Plan:
    size = cfg.size
    source = DataSpec(kind="sim", style=cfg.source_style, count=cfg.source_count, seed=0, size=size)
    if cfg.real_data:
        real = {"kind": cfg.real_layout, "uri": cfg.real_data, "size": size}
        target = DataSpec(**real, sequences=cfg.train_sequences, labelled=False)
        oracle_train = DataSpec(**real, sequences=cfg.train_sequences, labelled=True)
        evaluate = DataSpec(**real, sequences=cfg.eval_sequences)
        description = f"{cfg.real_layout}:{cfg.real_data} train {cfg.train_sequences} -> eval {cfg.eval_sequences}"
        if set(cfg.train_sequences) & set(cfg.eval_sequences):
            raise ValueError(f"train and eval sequences overlap: {set(cfg.train_sequences) & set(cfg.eval_sequences)}")
    else:
        target = DataSpec(kind="sim", style="real-like", count=cfg.target_count, seed=1, size=size, labelled=False)
        oracle_train = target.model_copy(update={"labelled": True})
        evaluate = DataSpec(kind="sim", style="real-like", count=cfg.eval_count, seed=2000, size=size)
        description = "embedded simulator: sim -> real-like renderer"

    runs = str(Path(cfg.runs_dir).resolve())
    tracking = TrackingConfig(experiment="endoflow-bench-adapt")

    def compute(epochs: int, **extra) -> ComputeConfig:
        return ComputeConfig(epochs=epochs, workers=cfg.workers, batch_size=cfg.batch_size, **extra)

    def segment(rung: str, data: DataSpec) -> SegmentJobConfig:
        return SegmentJobConfig(
            name=f"{cfg.name}-{rung}",
            runs_dir=runs,
            source=data,
            model=cfg.model,
            compute=compute(cfg.source_epochs),
            tracking=tracking,
        )

    teacher = str(Path(runs) / "ray" / f"{cfg.name}-source_only")
    translator_job = TranslatorJobConfig(
        name=f"{cfg.name}-translator-cut",
        runs_dir=runs,
        source=source,
        target=target,
        model=cfg.translator,
        segmenter_checkpoint=teacher,
        compute=compute(cfg.translator_epochs, lr=2e-4, weight_decay=0.0),
        tracking=tracking,
    )
    learned = AdaptStyleConfig(method="translator", translator=str(translator_job.generator_file))
    fda = AdaptStyleConfig(method="fda", beta=cfg.fda_beta)
    off = {"irb": IRBConfig(enabled=False), "pseudo": PseudoConfig(enabled=False)}

    def adapt(rung: str, style: AdaptStyleConfig, irb: bool, pseudo: bool) -> AdaptJobConfig:
        return AdaptJobConfig(
            name=f"{cfg.name}-{rung}",
            runs_dir=runs,
            source=source,
            target=target,
            style=style,
            irb=IRBConfig() if irb else off["irb"],
            pseudo=PseudoConfig(start_epoch=0) if pseudo else off["pseudo"],
            adversarial=AdversarialConfig(enabled=cfg.adversarial and pseudo),
            teacher_checkpoint=teacher,
            model=cfg.model,
            compute=compute(cfg.adapt_epochs),
            tracking=tracking,
        )

    jobs: dict = {}
    for rung in cfg.rungs:
        if rung == "source_only":
            jobs[rung] = segment(rung, source)
        elif rung == "fda":
            jobs[rung] = adapt(rung, fda, irb=False, pseudo=False)
        elif rung == "oracle":
            jobs[rung] = segment(rung, oracle_train)
        else:
            style = learned if rung == "translator" or cfg.irb_style == "translator" else fda
            if style is learned:
                jobs.setdefault("translator_training", translator_job)
            jobs[rung] = adapt(rung, style, irb=rung != "translator", pseudo=rung == "irb_pseudo")
    return Plan(source, target, oracle_train, evaluate, description, jobs)


def gap_closed(rungs: dict[str, float]) -> float | None:
    """(best adapted − source_only) / (oracle − source_only) on mean Dice; None without the three numbers."""
    adapted = [rungs[name] for name in ADAPTED if name in rungs]
    if "source_only" not in rungs or "oracle" not in rungs or not adapted:
        return None
    gap = rungs["oracle"] - rungs["source_only"]
    return None if gap <= 0 else (max(adapted) - rungs["source_only"]) / gap


def run_bench(cfg: BenchAdaptConfig, out: Path, progress=print) -> dict:
    from pipelines.local_ray import local_ray
    from pipelines.style_flow import train_translator
    from training import tracking

    bench_plan = plan(cfg)
    teacher_there = (Path(cfg.runs_dir) / "ray" / f"{cfg.name}-source_only").is_dir()
    if "source_only" not in cfg.rungs and any(r != "oracle" for r in cfg.rungs) and not teacher_there:
        raise ValueError("the adaptation rungs fine-tune the source_only model: include rung source_only")
    images, masks = load_data(bench_plan.evaluate)
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": list(os.getloadavg())},
        "data": bench_plan.description,
        "eval_frames": len(images),
        "config": cfg.model_dump(mode="json"),
        "starting_weights": encoder_provenance(cfg.model.encoder),
        "rungs": {},
    }
    started_all = time.perf_counter()
    with local_ray():
        tracking_uri = tracking.use_tracking(TrackingConfig(experiment="endoflow-bench-adapt"), cfg.runs_dir)
        for rung, job in bench_plan.jobs.items():
            progress(f"[bench adapt] {rung}: training ({time.perf_counter() - started_all:.0f}s so far)")
            started = time.perf_counter()
            _fresh(job)
            if isinstance(job, TranslatorJobConfig):
                path, metrics, _ = train_translator(job, fresh=True)
                report["translator"] = {"file": str(path), "seconds": round(time.perf_counter() - started, 1)}
                report["translator"] |= {k: round(v, 4) for k, v in metrics.items() if k.startswith("loss")}
                continue
            runner = segment_train.run if isinstance(job, SegmentJobConfig) else adapt_train.run
            trained = runner(job, tracking_uri)
            summary, _ = score(trained.model, images, masks)
            dice = summary["dice"]
            vf_gs = vocal_folds_glottal_dice(dice)
            report["rungs"][rung] = {
                "mean_dice": round(summary["mean_dice"], 4),
                "dice": {k: (None if v is None else round(v, 4)) for k, v in dice.items()},
                "vocal_folds_glottal_mean_dice": None if vf_gs is None else round(vf_gs, 4),
                "seconds": round(time.perf_counter() - started, 1),
            }
            progress(f"[bench adapt] {rung}: mean Dice {summary['mean_dice']:.4f}")
    means = {rung: entry["mean_dice"] for rung, entry in report["rungs"].items()}
    closed = gap_closed(means)
    adapted = {rung: means[rung] for rung in ADAPTED if rung in means}
    report["summary"] = {
        "mean_dice": means,
        "best_adapted": max(adapted, key=adapted.get) if adapted else None,
        "gap_closed": None if closed is None else round(closed, 4),
        "classes_vf_gs": [VOCAL_FOLDS, GLOTTAL_SPACE],
        "total_seconds": round(time.perf_counter() - started_all, 1),
        "load_average_at_end": list(os.getloadavg()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


def _fresh(job: SegmentJobConfig | AdaptJobConfig | TranslatorJobConfig) -> None:
    import shutil

    shutil.rmtree(Path(job.runs_dir) / "ray" / job.name, ignore_errors=True)
