"""Mask propagation end to end: MLflow run → Ray Train job → ONNX export + sequence parity → registry → evaluation.

Also the pieces the CLI and the benchmark share: loading a model as a backend (torch checkpoint, ONNX graphs on disk
or in the MLflow registry), scoring sequences by J&F with the first labelled frame given, beside the
copy-first-mask baseline, and scoring CT volumes by Dice and NSD with one key slice given, beside copying it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch

from pipelines.segment_flow import job_run, log_curves
from serving.resolve import resolve_model
from training import tracking
from training.data.classes import CLASS_COLOURS, VOID
from training.data.folders import DataError
from training.data.simulator import simulate_sequences
from training.data.sources import DataSpec
from training.data.volumes import Volume, slices_as_frames
from training.models.propagation.network import count_parameters
from training.propagate import train as propagate_train
from training.propagate.config import PropagateJobConfig
from training.propagate.export import (
    GRAPHS,
    ExportedGraphs,
    OnnxBackend,
    export_propagation,
    graph_metadata,
    load_graphs,
)
from training.propagate.inference import MemoryPolicy, SegmenterGuide, TorchBackend, propagate, propagate_volume
from training.propagate.key_frame_tuning import KeyFrameTuner, KeyFrameTuning
from training.propagate.pseudo_labels import OnnxReferenceSegmenter
from training.propagate.sequences import labelled_sequences, sequence_names
from training.propagation_metrics import dice, j_and_f, normalized_surface_dice
from training.visualize import comparison_grid, save_png

NSD_TOLERANCE_MM = 2.0  # the surface tolerance of the reported NSD ("nsd_2mm"): one voxel of a 2 mm scan


@dataclass
class PropagateResult:
    run_id: str
    model_path: Path
    graphs: ExportedGraphs
    parity: dict
    evaluation: dict | None
    train_seconds: float
    parameters: int
    registered_versions: dict[str, str] = field(default_factory=dict)


def save_model(model: torch.nn.Module, cfg: PropagateJobConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": cfg.model_dump(mode="json")}, path)
    return path


def last_weights_path(model_path: Path) -> Path:
    """Where a weight-averaged run's last trained weights are saved, beside the averaged model."""
    return model_path.with_name(f"{model_path.stem}.last-weights.pt")


_REGISTRY_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?P<tail>@[^/@]+|/[^/@]+)$")


def locate_model(model: str | Path, tracking_uri: str | None = None) -> Path | ExportedGraphs:
    """What a --model names: a torch checkpoint (.pt: training state or save_model's file), or the three ONNX
    graphs, on disk (one of them, or their directory) or registered (`registered_graphs`)."""
    if str(model).startswith("models:/"):
        return registered_graphs(str(model), tracking_uri)
    path = Path(model).expanduser()
    if path.suffix != ".pt":
        return load_graphs(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected a propagation checkpoint")
    return path


def registered_graphs(ref: str, tracking_uri: str | None = None) -> ExportedGraphs:
    """models:/NAME@ALIAS or models:/NAME/VERSION: the graphs `propagate train --register NAME@ALIAS` registered,
    NAME-encode_key, NAME-encode_value and NAME-segment at that alias (or version), downloaded from the registry."""
    match = _REGISTRY_REF.match(ref)
    if not match:
        raise ValueError(f"{ref!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    paths, runs = {}, {}
    for graph in GRAPHS:
        graph_ref = f"models:/{match['name']}-{graph}{match['tail']}"
        try:
            paths[graph] = resolve_model(graph_ref, tracking_uri=tracking_uri).path
        except (FileNotFoundError, ValueError) as err:
            raise FileNotFoundError(
                f"{ref}: registered graph missing: {err}; expected the three graphs "
                f"{match['name']}-{{{','.join(GRAPHS)}}} that `propagate train --register` registers"
            ) from err
        props = graph_metadata(paths[graph])
        if (props.get("endoflow.task"), props.get("endoflow.graph")) != ("propagation", graph):
            raise ValueError(
                f"{graph_ref}: endoflow.task {props.get('endoflow.task')!r}, endoflow.graph "
                f"{props.get('endoflow.graph')!r}; expected 'propagation' and {graph!r}"
            )
        runs[graph] = props.get("endoflow.source_run_id")
    # The graphs exchange features whose shapes and meaning belong to one set of weights: never mix two exports.
    if len(set(runs.values())) > 1:
        raise ValueError(f"{ref}: the three graphs come from different training runs {runs}; register them together")
    return ExportedGraphs(paths)


def load_backend(
    model: str | Path | ExportedGraphs,
    policy: MemoryPolicy,
    threads: int | None = None,
    tracking_uri: str | None = None,
):
    """The backend of a model as `locate_model` finds it (or of graphs already located). Torch backends use the
    policy's top_k; ONNX graphs have theirs baked in."""
    located = model if isinstance(model, ExportedGraphs) else locate_model(model, tracking_uri)
    if isinstance(located, ExportedGraphs):
        return OnnxBackend(located, threads=threads)
    state = torch.load(located, map_location="cpu", weights_only=False)
    if threads:
        torch.set_num_threads(threads)
    return TorchBackend(propagate_train.load_model(state), policy.top_k)


def load_backends(
    models: Sequence[str], policy: MemoryPolicy, size: int | None, threads: int | None, tracking_uri: str | None
) -> tuple[object, int]:
    """The backend of one --model, or the list of several (an ensemble, see inference.propagate), and the frame
    side to run at: `size`, else the models' training size, which must then agree."""
    if not models:
        raise ValueError("--model: give at least one propagation model")
    located = [locate_model(model, tracking_uri) for model in models]
    backends = [load_backend(model, policy, threads) for model in located]
    if size is None:
        sizes = {model: trained_size(found) for model, found in zip(models, located, strict=True)}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"--model: trained at different sizes {sizes}; choose one with --size")
        size = next(iter(sizes.values()))
    return (backends[0] if len(backends) == 1 else backends), size


def with_key_frame_tuning(backend, tuning: KeyFrameTuning | None, report=None):
    """The backend (or ensemble) with every member tuned on each key frame it streams from (key_frame_tuning), or
    unchanged when `tuning` is None. Tuning needs gradients: only torch checkpoints can be tuned."""
    if tuning is None:
        return backend
    members = list(backend) if isinstance(backend, list | tuple) else [backend]
    if not all(isinstance(member, TorchBackend) for member in members):
        raise ValueError(
            "--tune-steps: key-frame tuning trains the network, so --model must be torch checkpoints (.pt); "
            "ONNX graphs and models:/ refs cannot be tuned"
        )
    tuners = [KeyFrameTuner(member.model, tuning, member.top_k, report) for member in members]
    return tuners[0] if len(tuners) == 1 else tuners


def trained_size(model: str | Path | ExportedGraphs, tracking_uri: str | None = None) -> int:
    """The frame side the model was trained at (a checkpoint's data.size, or the graphs' endoflow.input_size)."""
    located = model if isinstance(model, ExportedGraphs) else locate_model(model, tracking_uri)
    if isinstance(located, ExportedGraphs):
        return int(json.loads(graph_metadata(located["segment"])["endoflow.input_size"])[0])
    return int(torch.load(located, map_location="cpu", weights_only=False)["config"]["data"]["size"])


def reference_segmenter(
    ref: str | Path, tracking_uri: str | None = None, threads: int | None = None
) -> OnnxReferenceSegmenter:
    """The segmentation ONNX a --segmenter names: a file, a directory holding model.onnx, or models:/NAME@ALIAS
    (models:/NAME/VERSION) in the registry at `tracking_uri`."""
    return OnnxReferenceSegmenter(resolve_model(ref, tracking_uri=tracking_uri).path, threads)


def score_sequence(
    backend, frames: np.ndarray, truth: np.ndarray, policy: MemoryPolicy, segmenter=None, guide_weight: float = 0.0
) -> dict:
    """The first frame's labels given, the rest propagated and scored; the copy-first-mask baseline beside it, and
    the scores with the truth's void pixels (class 0) left out as DAVIS leaves out its void pixels (`void_excluded`:
    painting an object onto void costs nothing there, where J and F count it as a false positive).
    `segmenter` (frames → class probabilities, OnnxReferenceSegmenter): scored alone beside it, and mixed into
    every propagated frame with `guide_weight` (> 0; SegmenterGuide)."""
    objects = [int(c) for c in np.unique(truth[0]) if c != 0]
    class_probs = segmenter(frames) if segmenter is not None else None
    guide = SegmenterGuide(class_probs, guide_weight) if class_probs is not None and guide_weight > 0 else None
    started = time.perf_counter()
    labels, confidence = propagate(backend, frames, truth[0], policy, guide=guide)
    seconds = time.perf_counter() - started
    copy = np.repeat(truth[:1], len(truth) - 1, axis=0)
    ours, baseline = j_and_f(truth[1:], labels[1:], objects), j_and_f(truth[1:], copy, objects)
    void = truth[1:] == VOID
    void_excluded = j_and_f(truth[1:], labels[1:], objects, void=void) if void.any() else ours  # same when none
    scores = {
        "frames": len(frames),
        "objects": objects,
        "J": ours["J"],
        "F": ours["F"],
        "J&F": ours["J&F"],
        "J_recall": ours["J_recall"],
        "J_decay": ours["J_decay"],
        "copy_first": {"J": baseline["J"], "F": baseline["F"], "J&F": baseline["J&F"]},
        "per_object_J": {str(k): v["J"] for k, v in ours["objects"].items()},
        "per_object": {str(k): v for k, v in ours["objects"].items()},
        "void_excluded": {
            "J": void_excluded["J"],
            "F": void_excluded["F"],
            "J&F": void_excluded["J&F"],
            "void_fraction": float(void.mean()),
            "per_object_J&F": {str(k): v["J&F"] for k, v in void_excluded["objects"].items()},
        },
        "frames_per_second": (len(frames) - 1) / seconds,
        "labels": labels,
        "confidence": confidence,
    }
    if class_probs is not None:
        alone = j_and_f(truth[1:], class_probs[1:].argmax(1).astype(np.uint8), objects)
        scores["segmenter_only"] = {"J": alone["J"], "F": alone["F"], "J&F": alone["J&F"]}
    return scores


def evaluate_sequences(
    backend,
    sequences: dict[str, tuple[np.ndarray, np.ndarray]],
    policy: MemoryPolicy,
    segmenter=None,
    guide_weight: float = 0.0,
    pictures: Path | None = None,
) -> dict:
    """Per-sequence scores (without label maps) and their means; with a segmenter, its own scores' mean too.
    `pictures`: a folder that gets one PNG per sequence (patient1/seq4 → patient1/seq4.png, as pseudo-label folders
    nest them), evenly spaced frames with the truth and the propagated labels overlaid (sequence_picture); their
    paths are in the report's "pictures"."""
    per_sequence, pictured = {}, {}
    for name, (frames, truth) in sequences.items():
        scores = score_sequence(backend, frames, truth, policy, segmenter, guide_weight)
        labels = scores.pop("labels")
        scores.pop("confidence")
        per_sequence[name] = scores
        if pictures is not None:
            pictured[name] = str(sequence_picture(frames, truth, labels, pictures / f"{name}.png"))
    keys = ("J", "F", "J&F")
    report = {
        "mean": {key: float(np.mean([s[key] for s in per_sequence.values()])) for key in keys},
        "copy_first_mean": {k: float(np.mean([s["copy_first"][k] for s in per_sequence.values()])) for k in keys},
        "void_excluded_mean": {k: float(np.mean([s["void_excluded"][k] for s in per_sequence.values()])) for k in keys},
        "sequences": per_sequence,
        "policy": policy.model_dump(),
    }
    if segmenter is not None:
        report["segmenter_only_mean"] = {
            k: float(np.mean([s["segmenter_only"][k] for s in per_sequence.values()])) for k in keys
        }
        report["segmenter_guide_weight"] = guide_weight
    if pictures is not None:
        report["pictures"] = pictured
    return report


def middle_key_slice(labels_xyz: np.ndarray, name: str | Path) -> int:
    """The middle one of a volume's annotated axial slices: where a key slice gives propagation the most context
    both ways."""
    annotated = [z for z in range(labels_xyz.shape[2]) if labels_xyz[:, :, z].any()]
    if not annotated:
        raise DataError(f"{name}: no labelled slice to start from")
    return annotated[len(annotated) // 2]


def score_volume(
    truth_xyz: np.ndarray, predicted_xyz: np.ndarray, keys: Sequence[int], spacing: Sequence[float]
) -> dict[str, dict[str, float]]:
    """Per organ of the truth: Dice and NSD (at NSD_TOLERANCE_MM, in mm through `spacing`) of the propagated
    labels, beside the same scores for copying each slice's nearest key slice."""
    nearest = [min(keys, key=lambda k: abs(k - z)) for z in range(truth_xyz.shape[2])]
    copied = truth_xyz[:, :, nearest]
    scores = {}
    for organ in [int(o) for o in np.unique(truth_xyz) if o]:
        truth, pred, copy = truth_xyz == organ, predicted_xyz == organ, copied == organ
        scores[str(organ)] = {
            "dice": dice(truth, pred),
            "nsd_2mm": normalized_surface_dice(truth, pred, NSD_TOLERANCE_MM, spacing),
            "copy_key_slice_dice": dice(truth, copy),
            "copy_key_slice_nsd_2mm": normalized_surface_dice(truth, copy, NSD_TOLERANCE_MM, spacing),
        }
    return scores


def evaluate_volumes(
    backend, volumes: Iterable[Volume], policy: MemoryPolicy, size: int, pictures: Path | None = None
) -> dict:
    """Per labelled volume (read one at a time: CT scans are large): its middle annotated slice given, the others
    propagated both ways at size×size and scored per organ (score_volume); means over every (volume, organ) pair
    and per organ, and slices/s. `pictures`: a folder that gets one PNG per volume (evenly spaced axial slices
    with the truth and the propagated labels overlaid)."""
    per_volume, pictured, seconds, slices = {}, {}, 0.0, 0
    for volume in volumes:
        if volume.labels is None:
            raise DataError(f"{volume.name}: no labels to score against (FLARE22 layout: labelsTr/<case>.nii.gz)")
        key = middle_key_slice(volume.labels, volume.name)
        started = time.perf_counter()
        predicted = propagate_volume(backend, volume.hu, {key: volume.labels[:, :, key]}, policy, size)
        seconds += time.perf_counter() - started
        slices += volume.hu.shape[2] - 1
        organs = score_volume(volume.labels, predicted, [key], volume.spacing)
        per_volume[volume.name] = {"slices": int(volume.hu.shape[2]), "key_slice": key, "organs": organs}
        if pictures is not None:
            pictured[volume.name] = str(volume_picture(volume, predicted, pictures / f"{volume.name}.png"))
    if not per_volume:
        raise DataError("no volumes to evaluate")
    measures = ("dice", "nsd_2mm", "copy_key_slice_dice", "copy_key_slice_nsd_2mm")
    pairs = [(organ, s) for v in per_volume.values() for organ, s in v["organs"].items()]
    by_organ = {organ: [s for o, s in pairs if o == organ] for organ in sorted({o for o, _ in pairs}, key=int)}
    report = {
        "mean": {m: float(np.mean([s[m] for _, s in pairs])) for m in measures},
        "per_organ": {o: {m: float(np.mean([s[m] for s in ss])) for m in measures} for o, ss in by_organ.items()},
        "volumes": per_volume,
        "slices_per_second": slices / seconds if seconds else None,
        "nsd_tolerance_mm": NSD_TOLERANCE_MM,
        "size": size,
        "policy": policy.model_dump(),
    }
    if pictures is not None:
        report["pictures"] = pictured
    return report


def volume_picture(volume: Volume, predicted_xyz: np.ndarray, path: Path, rows: int = 6) -> Path:
    """Evenly spaced axial slices (windowed) with the truth and the propagated labels overlaid. FLARE22 numbers its
    organs up to 13, past the palette's 6 colours: organs are coloured in the order of their numbers, cycling."""
    organs = np.setdiff1d(np.union1d(np.unique(volume.labels), np.unique(predicted_xyz)), [0])
    shown = np.zeros(256, np.uint8)
    shown[organs] = 1 + np.arange(len(organs)) % (len(CLASS_COLOURS) - 1)
    frames = slices_as_frames(volume.hu)
    truth, labels = (np.moveaxis(shown[m], 2, 0) for m in (volume.labels, predicted_xyz))
    return save_png(comparison_grid(frames, {"truth": truth, "propagated": labels}, rows=rows), path)


def sequence_picture(frames: np.ndarray, truth: np.ndarray, labels: np.ndarray, path: Path, rows: int = 6) -> Path:
    """`rows` evenly spaced frames of a sequence (the given first and the last among them): the image, the truth
    and the propagated labels overlaid, one frame a row."""
    return save_png(comparison_grid(frames, {"truth": truth, "propagated": labels}, rows=rows), path)


def named_sequences(spec: DataSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return dict(zip(sequence_names(spec), labelled_sequences(spec, dense=True), strict=True))


def sequence_parity(model, graphs: ExportedGraphs, frames: np.ndarray, truth: np.ndarray, policy: MemoryPolicy) -> dict:
    """One whole sequence through torch and through onnxruntime: J&F of each and their difference."""
    torch_scores = score_sequence(TorchBackend(model, policy.top_k), frames, truth, policy)
    onnx_scores = score_sequence(OnnxBackend(graphs), frames, truth, policy)
    return {
        "jf_torch": torch_scores["J&F"],
        "jf_onnx": onnx_scores["J&F"],
        "jf_abs_diff": abs(torch_scores["J&F"] - onnx_scores["J&F"]),
        "label_agreement": float(np.mean(torch_scores["labels"] == onnx_scores["labels"])),
        "confidence_max_abs_diff": float(np.abs(torch_scores["confidence"] - onnx_scores["confidence"]).max()),
    }


def train_and_export(
    cfg: PropagateJobConfig,
    out_dir: Path,
    eval_spec: DataSpec | None = None,
    register_as: tuple[str, str | None] | None = None,
    fresh: bool = False,
) -> PropagateResult:
    """Train (resuming a run of the same name unless `fresh`), export the graphs, check parity, register, score."""
    with job_run(cfg, out_dir, fresh) as (cfg, tracking_uri, run):
        started = time.perf_counter()
        trained = propagate_train.run(cfg, tracking_uri)
        train_seconds = time.perf_counter() - started
        mlflow.log_metric("train_seconds", train_seconds)
        model_path = save_model(trained.model, cfg, out_dir / f"{cfg.name}.pt")
        if trained.last_weights is not None:  # kept beside the average, to measure what averaging changed
            save_model(trained.last_weights, cfg, last_weights_path(model_path))

        graphs = export_propagation(trained.model, out_dir, cfg.name, cfg.data.size, cfg.memory, run.info.run_id)
        frames, truth = simulate_sequences(1, 12, seed=cfg.data.sim_seed + 777, style="real-like", size=cfg.data.size)
        parity = sequence_parity(trained.model, graphs, frames[0], truth[0], cfg.memory)
        mlflow.log_metrics({"onnx_parity_jf_abs_diff": parity["jf_abs_diff"]})
        evaluation = None
        if eval_spec is not None:
            pictures = out_dir / f"{cfg.name}_eval"
            evaluation = evaluate_sequences(
                OnnxBackend(graphs), named_sequences(eval_spec), cfg.memory, pictures=pictures
            )
            mlflow.log_metrics(
                {"eval_jf": evaluation["mean"]["J&F"], "eval_copy_first_jf": evaluation["copy_first_mean"]["J&F"]}
            )
            mlflow.log_artifacts(str(pictures), artifact_path="propagation")
            (out_dir / f"{cfg.name}_eval.json").write_text(json.dumps(evaluation, indent=2))
        log_curves(tracking_uri, run.info.run_id, cfg.name, out_dir, ("train_loss", "val_jf"))
        versions = {}
        if register_as is not None:
            for graph in GRAPHS:
                versions[graph] = tracking.register_onnx(graphs[graph], f"{register_as[0]}-{graph}", register_as[1])
        return PropagateResult(
            run_id=run.info.run_id,
            model_path=model_path,
            graphs=graphs,
            parity=parity,
            evaluation=evaluation,
            train_seconds=train_seconds,
            parameters=count_parameters(trained.model),
            registered_versions=versions,
        )
