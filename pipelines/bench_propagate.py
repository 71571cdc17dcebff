"""Propagation benchmark → runs/bench/propagate.json: J&F on simulator sequences and on the vocalfolds sequences
(first labelled frame given, beside the copy-first-mask baseline), torch/onnxruntime sequence parity, and
frames/s of the whole stream (encode_key + segment every frame, encode_value every frame with the default policy's
previous_frame, else every mem_every-th) at 256×256 with 2 CPU threads for torch and for onnxruntime. Every score
uses the default MemoryPolicy (min_area 0.005; the vocalfolds J&F without it is real_min_area_off). The vocalfolds
J&F and the onnxruntime frames/s are also given with the policy's flip_average (two mirrored streams averaged), and
the vocalfolds J&F with key-frame tuning (a copy of the network trained on the first frame's deformed views before
each sequence; torch, about a minute a sequence here) and with a segmenter guide (a segmentation network trained on
vocalfolds seq1–3, `guide_segmenter_config`, mixed into every frame at GUIDE_WEIGHT; also scored alone). When the
model is a weight average with its last trained weights saved beside it, those are scored too. The memory's length
is swept (MEMORY_SIZES as max_memory) on vocalfolds, on six 80-frame simulator sequences (LONG_SIM; the others are
too short to fill a larger memory) and for the onnxruntime frames/s. CT: eight simulator volumes (CT_SEEDS, never
trained on) with the middle labelled slice given, propagated both ways (min_area 0, the CT default): Dice and NSD at
2 mm per organ, beside copying the key slice (`ct_volumes`; the bench network sees CT slices only when its config's
data.sim_volumes > 0).

Without --model it uses runs/artifacts/propagate-bench.pt, training it first when missing (`bench_config`, the recipe
configs/propagate-bench.yaml: 6750 clip batches at 256×256, 65 min on 2 idle AMD EPYC cores, longer on slower or
shared ones; a stopped run resumes) on simulator data and vocalfolds seq1–3; seq4 is never trained on.
Vocalfolds: Laves et al., IJCARS 2019, CC BY 4.0.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipelines import segment_flow
from pipelines.local_ray import local_ray
from pipelines.propagate_flow import train_and_export
from training.config import load_config, load_recipe
from training.data.simulator import simulate_sequences
from training.data.sources import DataSpec
from training.data.volumes import simulate_volume
from training.models.encoders import EncoderName, encoder_provenance
from training.models.propagation.network import count_parameters
from training.propagate.config import PropagateJobConfig
from training.propagate.export import OnnxBackend, export_propagation
from training.propagate.inference import MemoryPolicy, TorchBackend, propagate
from training.propagate.key_frame_tuning import KeyFrameTuner, KeyFrameTuning
from training.propagate.models import last_weights_path, load_model
from training.propagate.pseudo_labels import OnnxReferenceSegmenter
from training.propagate.scoring import evaluate_sequences, evaluate_volumes, named_sequences, sequence_parity
from training.segment.config import SegmentJobConfig

BENCH_RECIPE = "propagate-bench.yaml"  # configs/: the bench network's training
TRAIN_SEQUENCES = ["seq1", "seq2", "seq3"]  # as in BENCH_RECIPE's data.real; the guide segmenter trains on them too
GUIDE_WEIGHT = 0.5  # fixed before any guided run was scored: an even mix, not tuned on seq4
MEMORY_SIZES = (8, 16, 32)  # max_memory values the bench also scores: seq4 (66 frames) outgrows a memory of 8
LONG_SIM = {"n_sequences": 6, "length": 80, "seed": 4244}  # simulator sequences long enough to fill 32 entries
CT_SEEDS = range(5000, 5008)  # simulator CT volumes (default 96×96×40 geometry); training volumes draw seeds from 0


def bench_config(
    real_root: Path | None, runs_dir: str = "runs", seed: int = 0, key_encoder: EncoderName = "scratch"
) -> PropagateJobConfig:
    """The bench network's training, configs/propagate-bench.yaml; another `seed` is the same training with other
    initial weights and clips (an ensemble member, saved as propagate-bench-seed<seed>), another `key_encoder` the
    same with the ImageNet Lite0 key encoder (propagate-bench-lite0-imagenet[-seed<seed>]). The vocalfolds sections
    read `real_root`, and are dropped when it has no img/ (simulator only)."""
    name = "propagate-bench" + ("" if key_encoder == "scratch" else f"-{key_encoder}")
    overrides = [
        f"name={name}" if seed == 0 else f"name={name}-seed{seed}",
        f"compute.seed={seed}",
        f"runs_dir={runs_dir}",
    ]
    if key_encoder != "scratch":
        overrides.append(f"model.key_encoder={key_encoder}")
    if real_root is not None and (real_root / "img").is_dir():
        overrides += [f"data.real.uri={json.dumps(str(real_root))}", f"val.uri={json.dumps(str(real_root))}"]
    else:
        overrides += ["data.real=", "val="]
    return load_recipe(PropagateJobConfig, BENCH_RECIPE, overrides)


def guide_segmenter_config(real_root: Path, runs_dir: str = "runs") -> SegmentJobConfig:
    """The segmenter that guides propagation: the segmentation job on vocalfolds seq1–3 (seq4 scored, never trained
    on), 30 epochs at 256×256, about 8 min on 2 cores."""
    vocalfolds = {"kind": "vocalfolds", "uri": str(real_root), "size": 256}
    overrides = [
        "name=propagate-bench-segmenter",
        f"runs_dir={runs_dir}",
        f"source={json.dumps(vocalfolds | {'sequences': TRAIN_SEQUENCES})}",
        f"val={json.dumps(vocalfolds | {'sequences': ['seq4']})}",
        "compute.epochs=30",
    ]
    return load_config(SegmentJobConfig, None, overrides)


def guide_segmenter(real_root: Path, runs_dir: str = "runs", threads: int = 2) -> OnnxReferenceSegmenter:
    """The guide's ONNX under runs/artifacts, trained first when missing."""
    cfg = guide_segmenter_config(real_root, runs_dir)
    out_dir = Path(cfg.runs_dir) / "artifacts"
    path = out_dir / f"{cfg.name}.onnx"
    if not path.is_file():
        with local_ray(num_cpus=None):
            path = segment_flow.train_and_export(cfg, cfg.val, out_dir).onnx_path
    return OnnxReferenceSegmenter(path, threads)


def held_out_mean(jf_by_sequence: dict[str, float], trained_on: list[str]) -> float | None:
    """Mean J&F of the sequences (named .../seqN) the network was not trained on; None when there are none."""
    held_out = [jf for name, jf in jf_by_sequence.items() if name.split("/")[-1] not in trained_on]
    return float(np.mean(held_out)) if held_out else None


def segmenter_guided(onnx, segmenter, sequences: dict, policy: MemoryPolicy, trained_on: list[str]) -> dict:
    """J&F with the segmenter guide at GUIDE_WEIGHT, the segmenter alone, per sequence and the held-out mean."""
    scored = evaluate_sequences(onnx, sequences, policy, segmenter, GUIDE_WEIGHT)
    guided = {name: s["J&F"] for name, s in scored["sequences"].items()}
    alone = {name: s["segmenter_only"]["J&F"] for name, s in scored["sequences"].items()}
    return {
        "guide_weight": GUIDE_WEIGHT,
        "flip_average": policy.flip_average,
        "mean_jf": scored["mean"]["J&F"],
        "segmenter_only_mean_jf": scored["segmenter_only_mean"]["J&F"],
        "held_out_mean_jf": held_out_mean(guided, trained_on),
        "held_out_segmenter_only_jf": held_out_mean(alone, trained_on),
        "sequences": {
            name: {"J&F": s["J&F"], "segmenter_only": s["segmenter_only"]["J&F"], "per_object_J": s["per_object_J"]}
            for name, s in scored["sequences"].items()
        },
    }


def memory_sweep(backend, sequences: dict, policy: MemoryPolicy, trained_on: list[str]) -> dict:
    """J&F with each of MEMORY_SIZES as max_memory (the rest of `policy` as is): the mean, the held-out mean and
    every sequence's, keyed by the memory size."""
    return {
        str(size): jf_summary(backend, sequences, policy.model_copy(update={"max_memory": size}), trained_on)
        for size in MEMORY_SIZES
    }


def stream_fps(backend, frames: np.ndarray, labels: np.ndarray, policy: MemoryPolicy, repeats: int = 2) -> float:
    """Frames/s of the stream after a warm-up pass (the first pass also sizes the runtimes' buffers)."""
    propagate(backend, frames, labels, policy)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        propagate(backend, frames, labels, policy)
        best = max(best, (len(frames) - 1) / (time.perf_counter() - started))
    return best


def jf_summary(backend, sequences: dict, policy: MemoryPolicy, trained_on: list[str]) -> dict:
    """J&F per sequence, their mean and the held-out mean."""
    scored = evaluate_sequences(backend, sequences, policy)
    per_sequence = {name: s["J&F"] for name, s in scored["sequences"].items()}
    return {
        "mean_jf": scored["mean"]["J&F"],
        "held_out_mean_jf": held_out_mean(per_sequence, trained_on),
        "sequences": per_sequence,
    }


def torch_backend(model_path: Path, top_k: int | None):
    state = torch.load(model_path, map_location="cpu", weights_only=False)
    return TorchBackend(load_model(state), top_k)


def without_average(model_path: Path, sequences: dict, policy: MemoryPolicy, trained_on: list[str]) -> dict:
    """J&F of a weight-averaged run's last trained weights (torch), per sequence and the held-out mean: the same
    run without the average."""
    return jf_summary(torch_backend(last_weights_path(model_path), policy.top_k), sequences, policy, trained_on)


def ensemble_of_seeds(model_paths: list[Path], sequences: dict, policy: MemoryPolicy, trained_on: list[str]) -> dict:
    """J&F of the ensemble (every member streams with its own memory and each frame takes the mean of their
    probabilities, inference.propagate) and of each member alone. Retrains of the bench differ on held-out seq4 by
    up to 0.1 (docs/experiments/004-seed-ensemble.md); averaging independently trained members is the standard
    remedy for that variance."""
    members = [torch_backend(path, policy.top_k) for path in model_paths]
    return {
        "members": [str(path) for path in model_paths],
        **jf_summary(members, sequences, policy, trained_on),
        "min_area_off": jf_summary(members, sequences, policy.model_copy(update={"min_area": 0.0}), trained_on),
        "each_member": [jf_summary(member, sequences, policy, trained_on) for member in members],
    }


def ensemble_fps(model_paths: list[Path], directory: Path, frames, labels, policy: MemoryPolicy, threads: int):
    """Frames/s of the ensemble's stream on onnxruntime: each member's three graphs, one stream each."""
    members = []
    for index, path in enumerate(model_paths):
        state = torch.load(path, map_location="cpu", weights_only=False)
        size = int(state["config"]["data"]["size"])
        graphs = export_propagation(load_model(state), directory, f"member{index}", size, policy)
        members.append(OnnxBackend(graphs, threads=threads))
    return stream_fps(members, frames, labels, policy)


def ct_volumes(backend, policy: MemoryPolicy, size: int, trained_volumes: int, seeds=CT_SEEDS) -> dict:
    """The CT set: simulator volumes `seeds` (none of them trained on), the middle labelled slice given, scored by
    evaluate_volumes with min_area 0 (the CT default: organs are small in their first and last slices)."""
    volumes = (simulate_volume(seed) for seed in seeds)
    scored = evaluate_volumes(backend, volumes, policy.model_copy(update={"min_area": 0.0}), size)
    return {"seeds": list(seeds), "trained_volumes": trained_volumes, **scored}


def key_frame_tuned(model, sequences: dict, policy: MemoryPolicy, trained_on: list[str]) -> dict:
    """J&F with key-frame tuning at its defaults (torch: it needs gradients), per sequence, and the held-out mean;
    seconds per sequence include the tuning."""
    tuning = KeyFrameTuning()
    scored = evaluate_sequences(KeyFrameTuner(model, tuning, policy.top_k), sequences, policy)
    per_sequence = {
        name: {"J&F": s["J&F"], "seconds": (s["frames"] - 1) / s["frames_per_second"]}
        for name, s in scored["sequences"].items()
    }
    return {
        "tuning": tuning.model_dump(),
        "mean_jf": scored["mean"]["J&F"],
        "held_out_mean_jf": held_out_mean({name: s["J&F"] for name, s in per_sequence.items()}, trained_on),
        "sequences": per_sequence,
    }


def trained_members(real_root: Path | None, seeds: range, key_encoder: EncoderName = "scratch") -> list[Path]:
    """The bench network trained with each seed: runs/artifacts/propagate-bench[-seedN].pt, trained when missing."""
    paths = []
    for seed in seeds:
        cfg = bench_config(real_root, seed=seed, key_encoder=key_encoder)
        path = Path(cfg.runs_dir) / "artifacts" / f"{cfg.name}.pt"
        if not path.is_file():
            print(f"[bench-propagate] training {cfg.name} (seed {seed})", flush=True)
            with local_ray(num_cpus=None):
                path = train_and_export(cfg, path.parent).model_path
        else:
            epochs = torch.load(path, map_location="cpu", weights_only=False)["config"]["compute"]["epochs"]
            if epochs != cfg.compute.epochs:  # an older bench's checkpoint: scored as it is, not silently as this one
                print(
                    f"[bench-propagate] {path} was trained {epochs} epochs, the bench now trains "
                    f"{cfg.compute.epochs}: scoring it as it is; delete it (and runs/ray/{cfg.name}/) to retrain",
                    flush=True,
                )
        paths.append(path)
    return paths


def bench_propagate(
    out: Path,
    model_path: Path | None,
    real_root: Path | None,
    threads: int = 2,
    ensemble: int = 1,
    key_encoder: EncoderName = "scratch",
) -> dict:
    """ensemble > 1: the bench network is also trained with seeds 1..ensemble-1 (each about as long as the first),
    and the ensemble of them all (`model_path` first, when given) is scored on vocalfolds as real_ensemble."""
    real_root = real_root if real_root is not None and (real_root / "img").is_dir() else None
    if ensemble < 1:
        raise ValueError(f"ensemble {ensemble}: expected 1 (one network) or more members")
    if ensemble > 1 and real_root is None:
        raise ValueError("an ensemble is scored on the vocalfolds sequences: give their root (real_data), with img/")
    members = trained_members(real_root, range(0 if model_path is None else 1, ensemble), key_encoder)
    if model_path is None:
        model_path = members[0]
    else:
        members = [Path(model_path), *members]
    state = torch.load(model_path, map_location="cpu", weights_only=False)
    model = load_model(state)
    trained_on = (state["config"]["data"].get("real") or {}).get("sequences") or []
    policy = MemoryPolicy()
    flipped = policy.model_copy(update={"flip_average": True})  # the offline option, beside the default stream
    torch.set_num_threads(threads)
    size = int(state["config"]["data"]["size"])  # J&F at the training size; frames/s at 256×256
    with tempfile.TemporaryDirectory() as directory:
        graphs = export_propagation(model, Path(directory), "bench", size, policy)
        onnx = OnnxBackend(graphs, threads=threads)
        frames, truth = simulate_sequences(6, 30, seed=4242, style="real-like", size=size)
        sim = evaluate_sequences(onnx, {f"sim{s}": (frames[s], truth[s]) for s in range(len(frames))}, policy)
        parity = sequence_parity(model, graphs, frames[0], truth[0], policy)
        frames, truth = simulate_sequences(**LONG_SIM, style="real-like", size=size)
        long_sim = {f"long{s}": (frames[s], truth[s]) for s in range(len(frames))}
        sim_long_memory = memory_sweep(onnx, long_sim, policy, trained_on=[])
        ct = ct_volumes(onnx, policy, size, trained_volumes=state["config"]["data"].get("sim_volumes", 0))
        frames, truth = simulate_sequences(1, 60, seed=4243, style="real-like", size=256)
        fps = {
            "torch": round(stream_fps(TorchBackend(model, policy.top_k), frames[0], truth[0, 0], policy), 1),
            "onnxruntime": round(stream_fps(onnx, frames[0], truth[0, 0], policy), 1),
            "onnxruntime_flip_average": round(stream_fps(onnx, frames[0], truth[0, 0], flipped), 1),
            "onnxruntime_by_max_memory": {
                str(m): round(stream_fps(onnx, frames[0], truth[0, 0], policy.model_copy(update={"max_memory": m})), 1)
                for m in MEMORY_SIZES
            },
            "onnxruntime_ensemble": (
                round(ensemble_fps(members, Path(directory), frames[0], truth[0, 0], policy, threads), 1)
                if len(members) > 1
                else None
            ),
            "objects": int(len(np.unique(truth[0, 0])) - (0 in truth[0, 0])),
            "frames": 60,
        }
        real = real_memory = real_min_area_off = real_flipped = real_tuned = real_guided = None
        real_last_weights = real_ensemble = None
        if real_root is not None:
            spec = DataSpec(kind="vocalfolds", uri=str(real_root), size=size)
            sequences = named_sequences(spec)
            real = evaluate_sequences(onnx, sequences, policy)
            real_min_area_off = jf_summary(onnx, sequences, policy.model_copy(update={"min_area": 0.0}), trained_on)
            real_memory = memory_sweep(onnx, sequences, policy, trained_on)
            scored = evaluate_sequences(onnx, sequences, flipped)
            real_flipped = {
                "mean_jf": scored["mean"]["J&F"],
                "sequences": {name: scores["J&F"] for name, scores in scored["sequences"].items()},
            }
            real_tuned = key_frame_tuned(model, sequences, policy, trained_on)
            segmenter = guide_segmenter(real_root, threads=threads)
            real_guided = {
                "plain": segmenter_guided(onnx, segmenter, sequences, policy, trained_on),
                "flip_average": segmenter_guided(onnx, segmenter, sequences, flipped, trained_on),
            }
            if last_weights_path(Path(model_path)).is_file():
                real_last_weights = without_average(Path(model_path), sequences, policy, trained_on)
            if len(members) > 1:
                real_ensemble = ensemble_of_seeds([Path(model_path), *members[1:]], sequences, policy, trained_on)
            for name, scores in real["sequences"].items():
                scores["trained_on"] = name.split("/")[-1] in trained_on
            real["held_out_mean_jf"] = held_out_mean({n: s["J&F"] for n, s in real["sequences"].items()}, trained_on)
            real["held_out_copy_first_jf"] = held_out_mean(
                {n: s["copy_first"]["J&F"] for n, s in real["sequences"].items()}, trained_on
            )
            real["held_out_void_excluded_jf"] = held_out_mean(
                {n: s["void_excluded"]["J&F"] for n, s in real["sequences"].items()}, trained_on
            )
    report = {
        "model": str(model_path),
        "starting_weights": encoder_provenance(state["config"]["model"].get("key_encoder", "scratch")),
        "parameters": count_parameters(model),
        "train_size": state["config"]["data"]["size"],
        "trained_on_real_sequences": trained_on,
        "eval_size": size,
        "policy": policy.model_dump(),
        "sim_mean": sim["mean"],
        "sim_copy_first_mean": sim["copy_first_mean"],
        "sim_long_memory": {"sequences": LONG_SIM, "by_max_memory": sim_long_memory},
        "real_held_out_mean_jf": real and real["held_out_mean_jf"],
        "real_held_out_copy_first_jf": real and real["held_out_copy_first_jf"],
        "real_held_out_void_excluded_jf": real and real["held_out_void_excluded_jf"],  # a diagnostic, not the target
        "real_mean_jf": real and real["mean"]["J&F"],
        "real_sequences": real and real["sequences"],
        "real_min_area_off": real_min_area_off,  # the same stream without the policy's min_area
        "real_memory": real_memory,  # the same stream with each of MEMORY_SIZES as max_memory
        "real_flip_average": real_flipped,
        "real_key_frame_tuning": real_tuned,
        "real_segmenter_guide": real_guided,
        "real_last_weights": real_last_weights,
        "real_ensemble": real_ensemble,
        "ct_volumes": ct,
        "parity": parity,
        "frames_per_second_256": fps,
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": threads,
            "load_average_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "note": "shared 2-core machine, loaded by other jobs during the run",
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report
