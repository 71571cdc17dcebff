"""Experiment 20 after the amendment: B on seq1-2 -> seq3, the rule picks A or B, then seq4 decision runs."""

import json
import time
from pathlib import Path

from pipelines.local_ray import local_ray
from pipelines.segment_flow import train_and_export
from training.data.sources import DataSpec
from training.loop import ComputeConfig
from training.models.unet import UNetConfig
from training.segment.config import SegmentJobConfig
from training.tracking import TrackingConfig

ROOT = "../shared/data/vocalfolds"
OUT = Path("runs/exp015")
CANDIDATES = {
    "A": UNetConfig(encoder="lite0-imagenet"),
    "B": UNetConfig(encoder="lite0-imagenet", encoder_lr_scale=0.1),
    "C": UNetConfig(encoder="lite0-imagenet", encoder_bn="frozen"),
}


def one(name, model, train_seqs, eval_seqs, seed):
    train = DataSpec(kind="vocalfolds", uri=ROOT, sequences=train_seqs)
    evaluate = DataSpec(kind="vocalfolds", uri=ROOT, sequences=eval_seqs)
    cfg = SegmentJobConfig(
        name=name,
        runs_dir="runs/exp015",
        source=train,
        val=None,
        model=model,
        compute=ComputeConfig(epochs=30, workers=2, batch_size=4, seed=seed),
        tracking=TrackingConfig(experiment="endoflow-exp015"),
    )
    t = time.time()
    r = train_and_export(cfg, evaluate, OUT / "artifacts", fresh=True)
    d = r.summary["dice"]
    vf, gs = d.get("vocal folds"), d.get("glottal space")
    row = {
        "name": name,
        "mean_dice": r.summary["mean_dice"],
        "vf_gs": (vf + gs) / 2 if vf is not None and gs is not None else None,
        "dice": d,
        "train_seconds": round(r.train_seconds),
        "wall": round(time.time() - t),
        "run_id": r.run_id,
    }
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print("RESULT", json.dumps(row), flush=True)
    return row


def results():
    return {json.loads(line)["name"]: json.loads(line) for line in open(OUT / "results.jsonl")}


if __name__ == "__main__":
    with local_ray():
        for key in ("B", "C"):
            if f"select-{key}" not in results():
                one(f"select-{key}", CANDIDATES[key], ["seq1", "seq2"], ["seq3"], 0)
        r = results()
        scores = {key: r[f"select-{key}"]["mean_dice"] for key in "ABC"}
        chosen = next(key for key in "ABC" if scores[key] >= max(scores.values()) - 0.01)
        print(f"RULE: seq3 mean Dice {scores} -> {chosen}", flush=True)
        (OUT / "chosen.txt").write_text(chosen)
        for seed in (0, 1):
            one(f"decide-{chosen}-seed{seed}", CANDIDATES[chosen], ["seq1", "seq2", "seq3"], ["seq4"], seed)
            one(f"decide-scratch-seed{seed}", UNetConfig(), ["seq1", "seq2", "seq3"], ["seq4"], seed)
