"""Benchmarks (JSON reports, never timed unit tests).

`segment`: the real-time segmenter learnt from scratch (`default`), the same decoder over the ImageNet Lite0 trunk
(`lite0_imagenet`, docs/experiments/020-pretrained-encoder.md) and a plain 4-level width-32 U-Net — onnxruntime
frames/s at 256×256 on this machine, and mean Dice when all train with the same data and budget (vocalfolds seq1–3 →
seq4 when the real data is present, else the embedded real-like simulator), with each model's starting weights.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipelines.local_ray import local_ray
from pipelines.segment_flow import train_and_export
from training.config import load_recipe
from training.data.sources import DataSpec
from training.export import export_segmenter
from training.models.encoders import encoder_provenance
from training.models.unet import Segmenter, UNetConfig, count_parameters
from training.segment.config import SegmentJobConfig


def onnx_frames_per_second(model: Segmenter, size: int = 256, threads: int = 2, runs: int = 50) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        path = export_segmenter(model, Path(directory) / "m.onnx", input_size=size)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    for _ in range(10):
        session.run(None, {"image": image})
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, {"image": image})
        timings.append(time.perf_counter() - started)
    median = statistics.median(timings)
    return {"median_ms": round(median * 1000, 2), "fps": round(1 / median, 1), "threads": threads, "runs": runs}


BENCH_RECIPE = "segment.yaml"  # configs/: the segmentation job every benched model trains
BENCH_MODELS = {
    "default": UNetConfig(),
    "lite0_imagenet": UNetConfig(encoder="lite0-imagenet"),
    "plain_unet": UNetConfig.plain(),
}


def bench_jobs(
    real_root: Path | None, epochs: int = 30, runs_dir: str = "runs/bench", models: Sequence[str] = tuple(BENCH_MODELS)
) -> tuple[str, dict]:
    """(what the data is, {model name: its training}): configs/segment.yaml with each of `models` (names of
    BENCH_MODELS), its name, `epochs`, `runs_dir` and the bench's MLflow experiment; the data read from `real_root`,
    or the embedded real-like simulator when it has no img/."""
    unknown = sorted(set(models) - set(BENCH_MODELS))
    if unknown:
        raise ValueError(f"unknown bench models {unknown}; known: {', '.join(BENCH_MODELS)}")
    if real_root is not None and (real_root / "img").is_dir():
        data = "vocalfolds seq1-3 -> seq4"
        sections = [f"source.uri={json.dumps(str(real_root))}", f"val.uri={json.dumps(str(real_root))}"]
    else:
        data = "embedded simulator, real-like renderer"
        train = DataSpec(kind="sim", style="real-like", count=240, seed=10)
        evaluate = DataSpec(kind="sim", style="real-like", count=96, seed=2000)
        sections = [f"source={train.model_dump_json()}", f"val={evaluate.model_dump_json()}"]
    common = [f"runs_dir={json.dumps(runs_dir)}", f"compute.epochs={epochs}", "tracking.experiment=endoflow-bench"]
    jobs = {}
    for name in models:
        model = BENCH_MODELS[name]
        job = [f"name=bench-{name}", f"model={model.model_dump_json()}", *common, *sections]
        jobs[name] = load_recipe(SegmentJobConfig, BENCH_RECIPE, job)
    return data, jobs


def bench_segment(
    out: Path,
    real_root: Path | None,
    epochs: int = 30,
    runs_dir: str = "runs/bench",
    models: Sequence[str] = tuple(BENCH_MODELS),
) -> dict:
    data, jobs = bench_jobs(real_root, epochs, runs_dir, models)
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "data": data,
        "epochs": epochs,
        "models": {},
    }
    with local_ray():
        for name, cfg in jobs.items():
            print(f"[bench] {name}: onnxruntime speed", flush=True)
            untrained = Segmenter(cfg.model)
            entry = {
                "starting_weights": encoder_provenance(cfg.model.encoder),
                "parameters": count_parameters(untrained),
                "onnx_cpu": onnx_frames_per_second(untrained),
            }
            print(f"[bench] {name}: training {epochs} epochs on {data}", flush=True)
            result = train_and_export(cfg, cfg.val, Path(runs_dir) / "artifacts", fresh=True)
            entry |= {
                "mean_dice": result.summary["mean_dice"],
                "dice": result.summary["dice"],
                "train_seconds": round(result.train_seconds, 1),
            }
            report["models"][name] = entry
    report["targets"] = {
        f"{name}_fps_at_least_30": entry["onnx_cpu"]["fps"] >= 30 for name, entry in report["models"].items()
    }
    report["targets"] |= {
        f"{name}_mean_dice_at_least_0.70": entry["mean_dice"] >= 0.70 for name, entry in report["models"].items()
    }
    if {"default", "plain_unet"} <= set(report["models"]):
        default, plain = report["models"]["default"], report["models"]["plain_unet"]
        report["targets"] |= {
            "dice_gap_to_plain": round(plain["mean_dice"] - default["mean_dice"], 4),
            "dice_within_0.02_of_plain": plain["mean_dice"] - default["mean_dice"] <= 0.02,
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report
