"""Experiment 15 driver (selection, then decision). Usage: python run.py select|decide"""

import json
import sys
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
        val=evaluate,
        model=model,
        compute=ComputeConfig(epochs=30, workers=2, batch_size=4, seed=seed),
        tracking=TrackingConfig(experiment="endoflow-exp015"),
    )
    t = time.time()
    r = train_and_export(cfg, evaluate, OUT / "artifacts", fresh=True)
    d = r.summary["dice"]
    row = {
        "name": name,
        "mean_dice": r.summary["mean_dice"],
        "vf_gs": (d["vocal folds"] + d["glottal space"]) / 2
        if d.get("vocal folds") is not None and d.get("glottal space") is not None
        else None,
        "dice": d,
        "train_seconds": round(r.train_seconds),
        "wall": round(time.time() - t),
        "run_id": r.run_id,
    }
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print("RESULT", json.dumps(row), flush=True)


if __name__ == "__main__":
    with local_ray():
        if sys.argv[1] == "select":
            for key in sys.argv[2:] or list(CANDIDATES):
                one(f"select-{key}", CANDIDATES[key], ["seq1", "seq2"], ["seq3"], 0)
        else:
            key = sys.argv[2]
            model = UNetConfig() if key == "scratch" else CANDIDATES[key]
            for seed in sys.argv[3:]:
                one(f"decide-{key}-seed{seed}", model, ["seq1", "seq2", "seq3"], ["seq4"], int(seed))
