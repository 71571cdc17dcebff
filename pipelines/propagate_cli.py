"""`endoflow propagate …`: train the propagation network, run it on a video or a CT volume, evaluate it on labelled
sequences (beside the copy-first-mask baseline), write pseudo-labels, benchmark it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, help="Mask propagation (STCN-style space-time memory network).")
console = Console()

ModelOption = Annotated[
    list[str],
    typer.Option(
        help="torch checkpoint .pt, ONNX graph (or their directory), or models:/NAME@ALIAS | models:/NAME/VERSION: "
        "the graphs `propagate train --register NAME@ALIAS` registered; repeat it for an ensemble (probabilities "
        "averaged every frame, each model with its own memory)"
    ),
]
TrackingOption = Annotated[
    str | None, typer.Option(help="MLflow registry for models:/ refs (default: $MLFLOW_TRACKING_URI, else runs/)")
]
SizeOption = Annotated[
    int | None, typer.Option(help="frames are resized to size×size, a multiple of 16 (default: the training size)")
]
MemEveryOption = Annotated[int, typer.Option(help="every N-th frame enters the memory")]
MaxMemoryOption = Annotated[int, typer.Option(help="memory bound in frames (the key frame always stays)")]
PreviousFrameOption = Annotated[
    bool, typer.Option(help="the frame just segmented is also read by the next one (a temporary memory entry)")
]
TopKOption = Annotated[int, typer.Option(help="top-k memory read for torch checkpoints (0: all)")]
FlipAverageOption = Annotated[
    bool,
    typer.Option(help="also propagate the mirrored frames (own memory) and average the two; twice the time"),
]
DEFAULT_MIN_AREA = 0.005  # MemoryPolicy's defaults, written out so that --help needs no torch import
DEFAULT_MAX_MEMORY = 16
MinAreaOption = Annotated[
    float,
    typer.Option(
        help="an object covering less than this fraction of a propagated frame is taken as absent there (its pixels "
        "get their next most probable label; 0: off)",
        min=0.0,
        max=0.5,
    ),
]
# `propagate` on a CT volume: an organ's first and last slices are small by nature, and the rule was chosen on video.
VolumeMinAreaOption = Annotated[
    float | None,
    typer.Option(
        "--min-area",
        help="an object covering less than this fraction of a propagated frame or slice is taken as absent there "
        f"(its pixels get their next most probable label; 0: off); default {DEFAULT_MIN_AREA} for video frames, 0 "
        "for CT volumes, whose organs are small in their first and last slices",
        min=0.0,
        max=0.5,
    ),
]
TuneStepsOption = Annotated[
    int,
    typer.Option(
        help="key-frame tuning: train a copy of a torch checkpoint this many steps on deformed views of each key "
        "frame before propagating from it (0: off; about a second a step on 2 cores at 256×256)",
        min=0,
    ),
]
GuideWeightOption = Annotated[
    float,
    typer.Option(
        help="with --segmenter: mix its class probabilities into every propagated frame with this weight before the "
        "frame is labelled and remembered (0: off), so a region that left the view is recognised when it comes back",
        min=0.0,
        max=1.0,
    ),
]
TuneLrOption = Annotated[float, typer.Option(help="key-frame tuning learning rate (AdamW)", min=0.0)]
ThreadsOption = Annotated[int | None, typer.Option(help="CPU threads for inference")]
SequencesOption = Annotated[
    list[str] | None,
    typer.Option("--sequence", help="a sequence (or with --layout flare22 a case) by name, repeatable"),
]


def _policy(
    mem_every: int,
    max_memory: int,
    previous_frame: bool,
    top_k: int,
    flip_average: bool,
    min_area: float,
):
    from training.propagate.inference import MemoryPolicy

    return MemoryPolicy(
        mem_every=mem_every,
        max_memory=max_memory,
        previous_frame=previous_frame,
        top_k=top_k or None,
        flip_average=flip_average,
        min_area=min_area,
    )


def _tuning(steps: int, learning_rate: float):
    """The key-frame tuning the options ask for (None when --tune-steps is 0), reporting its progress."""
    from training.propagate.key_frame_tuning import KeyFrameTuning

    if steps == 0:
        return None, None
    if learning_rate <= 0:
        _fail(ValueError(f"--tune-lr {learning_rate}: expected a learning rate > 0"))

    def report(step: int, loss: float) -> None:
        console.print(f"  key-frame tuning step {step}/{steps} loss {loss:.4f}")

    return KeyFrameTuning(steps=steps, learning_rate=learning_rate), report


def _guide_segmenter(segmenter: str | None, guide_weight: float, tracking_uri: str | None, threads: int | None = None):
    """The --segmenter's ONNX (None without one); --guide-weight needs one."""
    from pipelines.propagate_flow import reference_segmenter

    if guide_weight > 0 and not segmenter:
        raise ValueError(f"--guide-weight {guide_weight} mixes a segmenter's probabilities in: give --segmenter ONNX")
    return reference_segmenter(segmenter, _tracking(tracking_uri), threads) if segmenter else None


def _backends(models: list[str], policy, size: int | None, threads: int | None, tracking_uri: str | None):
    """The backend (or ensemble) of the --model options and the frame side to run at; each --model is looked up
    here (a path, graphs, or a models:/ ref in the registry), then loaded by training.propagate.models."""
    from pipelines.propagate_flow import locate_model
    from training.propagate.models import load_backends

    located = {model: locate_model(model, _tracking(tracking_uri)) for model in models}
    return load_backends(located, policy, size, threads)


def _tracking(tracking_uri: str | None) -> str:
    from training.tracking import default_tracking_uri

    return tracking_uri or default_tracking_uri()


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(2) from exc


def _spec(data: Path, layout: str, sequences: list[str] | None, size: int):
    from training.data.sources import DataSpec

    if layout not in ("vocalfolds", "folder"):
        _fail(ValueError(f"--layout {layout!r}: expected vocalfolds or folder"))
    return DataSpec(kind=layout, uri=str(data), sequences=sequences, size=size)


@app.command()
def train(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. compute.epochs=3")] = None,
    eval_data: Annotated[Path | None, typer.Option(help="vocalfolds root to evaluate on")] = None,
    eval_sequence: Annotated[
        list[str] | None, typer.Option("--eval-sequence", help="vocalfolds sequence to evaluate, repeatable")
    ] = None,
    register: Annotated[str | None, typer.Option(help="register the graphs as NAME-<graph>[@ALIAS]")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS or local)")] = None,
    fresh: Annotated[bool, typer.Option(help="start over instead of resuming a run of the same name")] = False,
    workers: Annotated[int | None, typer.Option(help="Ray Train workers (= --set compute.workers=N)")] = None,
) -> None:
    """Train (Ray Train; resumes a run of the same name), export the three ONNX graphs, check parity, register."""
    from pipelines.local_ray import local_ray
    from pipelines.propagate_flow import train_and_export
    from training.config import ConfigError, load_config
    from training.propagate.config import PropagateJobConfig

    overrides = (set_ or []) + ([f"compute.workers={workers}"] if workers else [])
    try:
        cfg = load_config(PropagateJobConfig, config, overrides)
    except ConfigError as exc:
        _fail(exc)
    eval_spec = _spec(eval_data, "vocalfolds", eval_sequence, cfg.data.size) if eval_data else None
    register_as = None
    if register:
        name, _, alias = register.partition("@")
        register_as = (name, alias or None)
    try:
        with local_ray(num_cpus=None, address=address):
            result = train_and_export(cfg, Path(cfg.runs_dir) / "artifacts", eval_spec, register_as, fresh=fresh)
    except ConfigError as exc:  # e.g. a run of this name exists with another model
        _fail(exc)
    console.print(f"model {result.model_path} ({result.parameters} parameters), run {result.run_id}")
    console.print(f"ONNX: {', '.join(str(p) for p in result.graphs.paths.values())}")
    console.print(f"sequence parity: J&F torch {result.parity['jf_torch']:.4f} onnx {result.parity['jf_onnx']:.4f}")
    if result.evaluation:
        mean, base = result.evaluation["mean"], result.evaluation["copy_first_mean"]
        console.print(f"J&F {mean['J&F']:.4f} (copy-first baseline {base['J&F']:.4f})")
    if result.registered_versions:
        console.print(f"registered {register}: {result.registered_versions}")


@app.command()
def evaluate(
    model: ModelOption,
    data: Annotated[Path, typer.Option(help="dataset root")],
    layout: Annotated[
        str,
        typer.Option(
            help="vocalfolds, folder (images/<seq>/, masks/<seq>/) or flare22 (CT volumes: "
            "imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz; the middle labelled slice given, Dice and NSD per "
            "organ)"
        ),
    ] = "vocalfolds",
    sequences: SequencesOption = None,
    out: Path = Path("runs/propagate/evaluate.json"),
    pictures: Annotated[
        Path | None,
        typer.Option(
            help="folder for one PNG per sequence or volume: frames (slices) with truth and propagation "
            "(default: OUT_pictures)"
        ),
    ] = None,
    size: SizeOption = None,
    mem_every: MemEveryOption = 2,
    max_memory: MaxMemoryOption = DEFAULT_MAX_MEMORY,
    previous_frame: PreviousFrameOption = True,
    top_k: TopKOption = 20,
    flip_average: FlipAverageOption = False,
    min_area: VolumeMinAreaOption = None,
    tune_steps: TuneStepsOption = 0,
    tune_lr: TuneLrOption = 1e-4,
    segmenter: Annotated[
        str | None,
        typer.Option(help="segmentation ONNX (file, directory or models:/ ref): scored alone beside propagation"),
    ] = None,
    guide_weight: GuideWeightOption = 0.0,
    threads: ThreadsOption = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Per sequence: the first labelled frame given, the rest propagated; J, F, J&F and the copy-first baseline.
    Per CT volume (--layout flare22): the middle labelled slice given; Dice and NSD per organ, and copying it."""
    from training.data.folders import DataError
    from training.propagate.ct_volumes import labelled_cases, read_cases
    from training.propagate.models import with_key_frame_tuning
    from training.propagate.scoring import evaluate_sequences, evaluate_volumes, named_sequences

    if layout not in ("vocalfolds", "folder", "flare22"):
        _fail(ValueError(f"--layout {layout!r}: expected vocalfolds, folder or flare22"))
    volumes = layout == "flare22"
    if volumes and (tune_steps or segmenter):
        _fail(ValueError("--tune-steps and --segmenter apply to video sequences, not to --layout flare22"))
    if min_area is None:
        min_area = 0.0 if volumes else DEFAULT_MIN_AREA
    policy = _policy(mem_every, max_memory, previous_frame, top_k, flip_average, min_area)
    tuning, report = _tuning(tune_steps, tune_lr)
    pictures = pictures or out.with_name(f"{out.stem}_pictures")
    try:
        backend, size = _backends(model, policy, size, threads, tracking_uri)
        if volumes:
            cases = labelled_cases(data, sequences)
            console.print(f"{len(cases)} volume(s) from {data}")
            report = evaluate_volumes(backend, read_cases(cases), policy, size, pictures)
        else:
            backend = with_key_frame_tuning(backend, tuning, report)
            reference = _guide_segmenter(segmenter, guide_weight, tracking_uri, threads)
            named = named_sequences(_spec(data, layout, sequences, size))
            report = evaluate_sequences(backend, named, policy, reference, guide_weight, pictures)
    except (DataError, FileNotFoundError, ValueError) as exc:
        _fail(exc)
    report |= {"model": model[0] if len(model) == 1 else model, "data": str(data), "layout": layout, "size": size}
    report["key_frame_tuning"] = tuning and tuning.model_dump()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if volumes:
        _print_volume_scores(report)
        console.print(f"report: {out}; pictures: {pictures}")
        return
    for name, scores in report["sequences"].items():
        alone = f", segmenter alone {scores['segmenter_only']['J&F']:.4f}" if segmenter else ""
        void = scores["void_excluded"]
        void_note = (
            f"; {void['J&F']:.4f} with its void pixels ({void['void_fraction']:.1%}) left out"
            if void["void_fraction"]
            else ""
        )
        console.print(
            f"{name}: J&F {scores['J&F']:.4f} (copy-first {scores['copy_first']['J&F']:.4f}{alone}){void_note}"
        )
        for label, obj in scores["per_object"].items():
            absent = f", false positive in {obj['false_positive_frames']} of its {obj['absent_frames']} absent frames"
            console.print(
                f"  object {label}: J&F {obj['J&F']:.3f}, J recall {obj['J_recall']:.2f}, J decay {obj['J_decay']:+.2f}"
                + (absent if obj["absent_frames"] else "")
            )
    mean, base = report["mean"], report["copy_first_mean"]
    console.print(f"mean J&F {mean['J&F']:.4f} J {mean['J']:.4f} F {mean['F']:.4f} (copy-first J&F {base['J&F']:.4f})")
    console.print(f"report: {out}; pictures: {pictures}")


def _print_volume_scores(report: dict) -> None:
    from training.data.volumes import ORGANS

    def line(scores: dict) -> str:
        return (
            f"Dice {scores['dice']:.3f} NSD@{report['nsd_tolerance_mm']:g}mm {scores['nsd_2mm']:.3f} (copying the key "
            f"slice: Dice {scores['copy_key_slice_dice']:.3f} NSD {scores['copy_key_slice_nsd_2mm']:.3f})"
        )

    for name, volume in report["volumes"].items():
        console.print(f"{name}: key slice {volume['key_slice']} of {volume['slices']}")
        for organ, scores in volume["organs"].items():
            console.print(f"  organ {organ} ({ORGANS.get(int(organ), 'unnamed')}): {line(scores)}")
    pairs = sum(len(v["organs"]) for v in report["volumes"].values())
    console.print(f"mean over {pairs} organs of {len(report['volumes'])} volume(s): {line(report['mean'])}")


@app.command()
def run(
    model: ModelOption,
    input: Annotated[Path, typer.Option("--input", help="a folder of frames, or a NIfTI volume (.nii/.nii.gz)")],
    out: Annotated[Path, typer.Option(help="output folder")],
    mask: Annotated[Path | None, typer.Option(help="label map PNG of the key frame (video)")] = None,
    segmenter: Annotated[
        str | None, typer.Option(help="segmentation ONNX (file, directory or models:/ ref) that labels the key frame")
    ] = None,
    key_index: Annotated[int, typer.Option(help="key frame (video) index; -1: the middle frame")] = 0,
    labels: Annotated[Path | None, typer.Option(help="NIfTI labels holding the annotated key slices")] = None,
    key_slices: Annotated[str | None, typer.Option(help="comma-separated slice indices (default: middle)")] = None,
    size: SizeOption = None,
    mem_every: MemEveryOption = 2,
    max_memory: MaxMemoryOption = DEFAULT_MAX_MEMORY,
    previous_frame: PreviousFrameOption = True,
    top_k: TopKOption = 20,
    flip_average: FlipAverageOption = False,
    min_area: VolumeMinAreaOption = None,
    tune_steps: TuneStepsOption = 0,
    tune_lr: TuneLrOption = 1e-4,
    guide_weight: GuideWeightOption = 0.0,
    tracking_uri: TrackingOption = None,
) -> None:
    """Propagate: video frames + a key-frame mask → a label PNG per frame (forward, or both ways from a middle key
    frame); a CT volume + annotated key slices → a NIfTI label volume (both directions through the slices)."""
    from training.data.folders import DataError
    from training.propagate.ct_volumes import propagate_nifti
    from training.propagate.frame_folder import propagate_frame_folder
    from training.propagate.models import with_key_frame_tuning

    volume = input.name.endswith((".nii", ".nii.gz"))
    if min_area is None:
        min_area = 0.0 if volume else DEFAULT_MIN_AREA
    policy = _policy(mem_every, max_memory, previous_frame, top_k, flip_average, min_area)
    tuning, report = _tuning(tune_steps, tune_lr)
    try:
        backend, size = _backends(model, policy, size, None, tracking_uri)
        backend = with_key_frame_tuning(backend, tuning, report)
        if volume:
            if guide_weight > 0:
                raise ValueError("--guide-weight applies to video frames; CT volumes propagate from their key slices")
            written = propagate_nifti(backend, input, labels, key_slices, out, policy, size)
        else:
            labeller = _guide_segmenter(segmenter, guide_weight, tracking_uri)
            written = propagate_frame_folder(backend, input, mask, labeller, key_index, out, policy, size, guide_weight)
    except (DataError, FileNotFoundError, ValueError) as exc:
        _fail(exc)
    console.print(f"wrote {written}")


@app.command("simulate-ct")
def simulate_ct(
    out: Annotated[Path, typer.Option(help="root of a FLARE22-layout folder: writes imagesTr/ and labelsTr/ in it")],
    count: Annotated[int, typer.Option(min=1, help="volumes to write")] = 8,
    seed: Annotated[int, typer.Option(help="volume i uses seed + i; the default set is the bench's CT volumes")] = 5000,
) -> None:
    """Simulated CT-like volumes (96×96×40 at 2×2×4 mm, five organs) as NIfTI files, e.g. for `propagate evaluate
    --layout flare22` or `propagate run --input`."""
    from training.data.volumes import simulate_volume, write_case

    for i in range(count):
        image, _ = write_case(out, simulate_volume(seed + i))
        console.print(f"{image}")
    console.print(f"{count} volume(s) with labels under {out}")


@app.command("pseudo-label")
def pseudo_label(
    model: ModelOption,
    segmenter: Annotated[str, typer.Option(help="the reference segmenter: segmentation ONNX or models:/ ref")],
    data: Annotated[Path, typer.Option(help="frames: a vocalfolds or folder dataset root")],
    out: Annotated[Path, typer.Option(help="output dataset folder")],
    layout: Annotated[str, typer.Option(help="vocalfolds or folder")] = "vocalfolds",
    sequences: SequencesOption = None,
    threshold: Annotated[float, typer.Option(help="largest mutual-agreement uncertainty kept")] = 0.3,
    key_every: Annotated[int, typer.Option(help="every k-th frame is a key frame")] = 10,
    min_kept: Annotated[float, typer.Option(help="a frame is written if this fraction of it is kept")] = 0.5,
    size: SizeOption = None,
    flip_average: FlipAverageOption = False,
    min_area: MinAreaOption = DEFAULT_MIN_AREA,
    tune_steps: TuneStepsOption = 0,
    tune_lr: TuneLrOption = 1e-4,
    check_truth: Annotated[bool, typer.Option(help="vocalfolds: score kept pixels against the annotations")] = True,
    tracking_uri: TrackingOption = None,
) -> None:
    """The segmenter labels key frames, propagation fills the rest, agreeing pixels are kept (others: keep/ = 0)."""
    from pipelines.propagate_flow import reference_segmenter
    from training.data.folders import DataError
    from training.propagate.models import with_key_frame_tuning
    from training.propagate.pseudo_labels import PseudoLabelConfig, pseudo_label_dataset

    cfg = PseudoLabelConfig(threshold=threshold, key_every=key_every, min_kept=min_kept)
    memory = cfg.memory.model_copy(update={"flip_average": flip_average, "min_area": min_area})
    cfg = cfg.model_copy(update={"memory": memory})
    tuning, report = _tuning(tune_steps, tune_lr)
    try:
        backend, size = _backends(model, cfg.memory, size, None, tracking_uri)
        backend = with_key_frame_tuning(backend, tuning, report)
        reference = reference_segmenter(segmenter, _tracking(tracking_uri))
        summary = pseudo_label_dataset(
            backend, reference, data, out, cfg, layout, sequences, size, check_truth, progress=console.print
        )
    except (DataError, FileNotFoundError, ValueError) as exc:
        _fail(exc)
    console.print(f"{summary['frames_written']} frames, {summary['pixels_kept']:.1%} of their pixels kept → {out}")
