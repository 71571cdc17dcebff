"""`endoflow bench patient`: what a few labels of a new patient buy. vocalfolds patient 1 (Laves et al., IJCARS
2019, CC BY 4.0), seq4 never read by any training step (not its frames, not its labels) and scored at the end.

Rows, each `endoflow patient adapt` with another config (the same epochs, size and model):
    oracle               all labels of seq1–3, no propagation
    k{K}_labels          K labelled frames per sequence alone (K = 1: the first labelled frame; K = 3: evenly spaced
                         from the first), each repeated so that the set is about as large as the oracle's: every row
                         then takes about the same number of optimiser steps
    k{K}_propagated      the same K frames propagated through their sequences with the bench propagation model, kept
                         where the k{K}_labels segmenter agrees, fine-tuned from the k{K}_labels model
    k1_propagated_{enc}  k1_propagated with a pretrained encoder (trained from its pretrained start, not from
                         k1_labels, whose trunk differs); the k1_labels segmenter still judges agreement
    zero_label*          not trained here: the FDA + IRB rung of `make bench-adapt`'s vocalfolds ladders
                         (runs/bench/adapt-vocalfolds.json at 128 px, adapt-vocalfolds-lite0-256.json with the
                         pretrained encoder at 256 px), when those reports exist
Dice of vocal folds + glottal space (their mean) and the mean over the classes present, on seq4; wall time per row,
and for the K = 1 chain (k1_labels then k1_propagated) as a patient would run it without a current segmenter.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from training.config import StrictModel, apply_override, load_config
from training.data.folders import vocalfolds_index
from training.data.sources import DataSpec
from training.metrics import vocal_folds_glottal_dice
from training.patient.config import PatientJobConfig

DEFAULT_PROPAGATION_MODEL = "runs/artifacts/propagate-bench.pt"
PREREQUISITE = "make bench-propagate"  # trains DEFAULT_PROPAGATION_MODEL (about 65 min on 2 cores)


class BenchPatientConfig(StrictModel):
    real_data: str = "../shared/data/vocalfolds"
    patient: str = "patient1"
    train_sequences: list[str] = ["seq1", "seq2", "seq3"]
    eval_sequences: list[str] = Field(["seq4"], description="scored, never read by training")
    ks: list[int] = Field([1, 3], description="labelled frames per training sequence")
    encoders: list[str] = Field(["lite0-imagenet"], description="pretrained encoders of the extra K = 1 row")
    propagation_model: str = DEFAULT_PROPAGATION_MODEL
    zero_label_reports: dict[str, str] = Field(
        {
            "zero_label": "runs/bench/adapt-vocalfolds.json",
            "zero_label_lite0_256": "runs/bench/adapt-vocalfolds-lite0-256.json",
        },
        description="row → a vocalfolds `bench adapt` report whose FDA + IRB rung is that row",
    )
    epochs: int = Field(20, ge=1)
    size: int = 256
    workers: int = 2
    batch_size: int = 4
    set: list[str] = Field([], description="overrides of every row's PatientJobConfig, e.g. pseudo.threshold=0.2")
    name: str = "bench-patient"
    runs_dir: str = "runs/bench/patient"


@dataclass
class Plan:
    evaluate: DataSpec
    labels: dict[str, dict[str, Path]]  # labels folder → {annot file read: where its copy goes}
    jobs: dict[str, PatientJobConfig]  # in running order: a row's segmenter / checkpoint is trained before it


def plan(cfg: BenchPatientConfig) -> Plan:
    """Every row's config and the label folders they read, from the dataset's listing (nothing decoded)."""
    overlap = set(cfg.train_sequences) & set(cfg.eval_sequences)
    if overlap:
        raise ValueError(f"train and eval sequences overlap: {sorted(overlap)}")
    index = vocalfolds_index(cfg.real_data, patients=[cfg.patient], sequences=cfg.train_sequences)
    by_sequence: dict[str, list[str]] = {}
    for annot, sequence in zip(index.masks, index.sequences, strict=True):
        by_sequence.setdefault(sequence, []).append(annot)
    runs = Path(cfg.runs_dir).resolve()

    def chosen(k: int | None) -> dict[str, Path]:
        """k evenly spaced labelled frames of each sequence from its first (None: all), as label-folder copies."""
        picks = {}
        for sequence, annots in by_sequence.items():
            annots = sorted(annots)
            step = 1 if k is None or k >= len(annots) else (len(annots) - 1) / max(k - 1, 1)
            taken = annots if k is None else [annots[round(i * step)] for i in range(min(k, len(annots)))]
            picks |= {a: runs / f"labels-{'all' if k is None else f'k{k}'}" / sequence / Path(a).name for a in taken}
        return picks

    labels = {"all": chosen(None)} | {f"k{k}": chosen(k) for k in cfg.ks}
    oracle_frames = len(labels["all"])
    data = {"frames": str(Path(cfg.real_data).resolve()), "layout": "vocalfolds"}
    data["sequences"] = [f"{cfg.patient}/{s}" for s in cfg.train_sequences]

    def job(row: str, labels_of: str, **fields) -> PatientJobConfig:
        base = {
            "name": f"{cfg.name}-{row}",
            "runs_dir": str(runs),
            "size": cfg.size,
            "data": data | {"labels": str(runs / f"labels-{labels_of}")},
            "compute": {"epochs": cfg.epochs, "workers": cfg.workers, "batch_size": cfg.batch_size},
            "tracking": {"experiment": "endoflow-bench-patient"},
        }
        tree = _merge(PatientJobConfig().model_dump(mode="json"), base | fields)
        for override in cfg.set:  # last, so that they win over the bench's own choices
            apply_override(tree, override)
        return load_config(PatientJobConfig, None, [f"{key}={json.dumps(value)}" for key, value in tree.items()])

    def onnx_of(row: str) -> str:
        name = f"{cfg.name}-{row}"
        return str(runs / "patient" / name / f"{name}.onnx")

    jobs = {"oracle": job("oracle", "all", pseudo={"enabled": False}, labelled_copies=1)}
    propagation = str(Path(cfg.propagation_model).resolve())
    for k in cfg.ks:
        copies = max(1, round(oracle_frames / len(labels[f"k{k}"])))
        jobs[f"k{k}_labels"] = job(f"k{k}_labels", f"k{k}", pseudo={"enabled": False}, labelled_copies=copies)
        segmenter = onnx_of(f"k{k}_labels")
        propagated = {"pseudo": {"enabled": True}, "propagation_model": propagation, "segmenter": segmenter}
        init = str(runs / "ray" / f"{cfg.name}-k{k}_labels")
        jobs[f"k{k}_propagated"] = job(f"k{k}_propagated", f"k{k}", init_checkpoint=init, **propagated)
        if k == 1:
            for encoder in cfg.encoders:
                row = f"k1_propagated_{encoder}"
                model = jobs["k1_labels"].model.model_dump(mode="json") | {"encoder": encoder}
                jobs[row] = job(row, "k1", model=model, **propagated)
    evaluate = DataSpec(
        kind="vocalfolds", uri=cfg.real_data, patients=[cfg.patient], sequences=cfg.eval_sequences, size=cfg.size
    )
    return Plan(evaluate, labels, jobs)


def check_propagation_model(path: str) -> Path:
    found = Path(path)
    if not found.is_file():
        raise FileNotFoundError(
            f"{found}: no propagation model; `{PREREQUISITE}` trains it (about 65 min on 2 cores), or pass "
            "--propagation-model PATH (a .pt, the graphs, or models:/NAME@ALIAS)"
        )
    return found


def write_labels(bench_plan: Plan) -> None:
    for copies in bench_plan.labels.values():
        for source, destination in copies.items():
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)


def run_bench(cfg: BenchPatientConfig, out: Path, progress=print) -> dict:
    from pipelines.local_ray import local_ray
    from pipelines.patient_flow import adapt_patient

    if not cfg.propagation_model.startswith("models:/"):
        check_propagation_model(cfg.propagation_model)
    bench_plan = plan(cfg)
    write_labels(bench_plan)
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": list(os.getloadavg())},
        "data": f"vocalfolds {cfg.patient}: train {cfg.train_sequences} -> eval {cfg.eval_sequences}",
        "config": cfg.model_dump(mode="json"),
        "labelled_frames": {name: len(copies) for name, copies in bench_plan.labels.items()},
        "rows": {},
    }
    started_all = time.perf_counter()
    with local_ray():
        for row, job in bench_plan.jobs.items():
            progress(f"[bench patient] {row} ({time.perf_counter() - started_all:.0f}s so far)")
            result = adapt_patient(job, bench_plan.evaluate, fresh=True, progress=progress)
            dice = result.release.summary["dice"]
            vf_gs = vocal_folds_glottal_dice(dice)
            report["rows"][row] = {
                "vocal_folds_glottal_mean_dice": None if vf_gs is None else round(vf_gs, 4),
                "mean_dice": round(result.release.summary["mean_dice"], 4),
                "dice": {k: (None if v is None else round(v, 4)) for k, v in dice.items()},
                "frames_written": result.frames_written,
                "pixels_kept": round(result.pixels_kept, 4),
                "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
                "run_id": result.release.run_id,
            }
    for row, path in cfg.zero_label_reports.items():
        report["rows"][row] = zero_label_row(Path(path))
    report["summary"] = summary(report["rows"])
    report["summary"]["total_seconds"] = round(time.perf_counter() - started_all, 1)
    report["summary"]["load_average_at_end"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


def zero_label_row(path: Path) -> dict:
    """The FDA + IRB rung of the vocalfolds adaptation ladder, taken from its report (not trained here)."""
    if not path.is_file():
        return {"from": str(path), "missing": "run `make bench-adapt` for it"}
    ladder = json.loads(path.read_text())
    rung = ladder["rungs"].get("irb")
    if rung is None:
        return {"from": str(path), "missing": "the report has no irb rung"}
    config = ladder.get("config", {})
    setting = f"{config.get('size')} px, encoder {config.get('model', {}).get('encoder', 'scratch')}"
    keys = ("vocal_folds_glottal_mean_dice", "mean_dice", "dice", "seconds")
    return {"from": f"{path} (rung irb: FDA + IRB, {setting})"} | {k: rung.get(k) for k in keys}


def summary(rows: dict) -> dict:
    """The issue's targets: K = 1 with propagation ≥ 0.95 × the oracle on VF+GS; the K = 1 chain ≤ 15 min."""
    vf_gs = {row: entry.get("vocal_folds_glottal_mean_dice") for row, entry in rows.items()}
    oracle, k1 = vf_gs.get("oracle"), vf_gs.get("k1_propagated")
    chain = [rows[r]["seconds"]["total"] for r in ("k1_labels", "k1_propagated") if r in rows and "seconds" in rows[r]]
    k1_seconds = rows.get("k1_propagated", {}).get("seconds", {}).get("total")
    return {
        "vocal_folds_glottal_mean_dice": vf_gs,
        "k1_propagated_over_oracle": None if not (oracle and k1 is not None) else round(k1 / oracle, 4),
        "target_k1_at_least_095_of_oracle": None if not (oracle and k1 is not None) else k1 >= 0.95 * oracle,
        "k1_chain_seconds": round(sum(chain), 1) if chain else None,
        "target_k1_propagated_within_15_min": None if k1_seconds is None else k1_seconds <= 15 * 60,
    }


def _merge(tree: dict, update: dict) -> dict:
    """`update` over `tree`, section by section (a nested mapping updates, anything else replaces)."""
    merged = dict(tree)
    for key, value in update.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if nested else value
    return merged
