"""`endoflow patient adapt`: a new patient's sequences and K labelled frames → pseudo-labels → a fine-tuned,
registered segmenter. Parses, builds the typed config (training/patient/config.py), calls pipelines/patient_flow.py,
prints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, help="A new patient: label a few frames, propagate, fine-tune, register.")
console = Console()


@app.command()
def adapt(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (configs/patient.yaml)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. pseudo.threshold=0.2")] = None,
    frames: Annotated[
        Path | None,
        typer.Option(help="the patient's frames: a folder of sequence folders, a vocalfolds root, videos or a video"),
    ] = None,
    layout: Annotated[
        str | None,
        typer.Option(help="frames (default), vocalfolds, video (one file per sequence), or flare22 (CT volumes)"),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="label maps of the labelled frames, <sequence>/<frame>.png like the frames (video: 000042)"),
    ] = None,
    sequences: Annotated[list[str] | None, typer.Option("--sequence", help="a sequence by name, repeatable")] = None,
    propagation_model: Annotated[
        str | None, typer.Option(help="propagation checkpoint .pt, its ONNX graphs, or models:/NAME@ALIAS")
    ] = None,
    segmenter: Annotated[
        str | None, typer.Option(help="the current segmenter: ONNX file or models:/NAME@ALIAS")
    ] = None,
    init_checkpoint: Annotated[
        str | None, typer.Option(help="segment/adapt checkpoint to fine-tune from (default: model config's start)")
    ] = None,
    register: Annotated[str | None, typer.Option(help="register the fine-tuned ONNX as NAME or NAME@ALIAS")] = None,
    eval_data: Annotated[
        Path | None, typer.Option(help="YAML DataSpec of labelled frames scored after training")
    ] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS or local)")] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="continue a stopped fine-tuning of the same name instead of starting over; only right with the same "
            "inputs, since the pseudo-labelled set is written anew every time"
        ),
    ] = False,
) -> None:
    """Check every input, propagate each labelled frame through its sequence both ways, keep the pixels the
    segmenter agrees with, fine-tune (Ray Train), export ONNX, register; pictures and scores in MLflow."""
    import json

    from pipelines.patient_flow import adapt_patient
    from training.config import ConfigError, load_config
    from training.data.folders import DataError
    from training.data.sources import DataSpec
    from training.patient.config import PatientJobConfig

    options = {
        "data.frames": frames and str(frames.resolve()),
        "data.layout": layout,
        "data.labels": labels and str(labels.resolve()),
        "data.sequences": sequences and json.dumps(sequences),
        "propagation_model": propagation_model,
        "segmenter": segmenter,
        "init_checkpoint": init_checkpoint,
    }
    overrides = (set_ or []) + [f"{key}={value}" for key, value in options.items() if value]
    register_as = None
    if register:
        name, _, alias = register.partition("@")
        register_as = (name, alias or None)
    try:
        cfg = load_config(PatientJobConfig, config, overrides)
        eval_spec = load_config(DataSpec, eval_data) if eval_data else None
        result = adapt_patient(cfg, eval_spec, register_as, not resume, progress=console.print, address=address)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    release = result.release
    console.print(f"ONNX: {release.onnx_path} (parity max |Δ| {release.parity_max_abs_diff:.1e}), run {release.run_id}")
    if release.summary:
        console.print(f"mean Dice {release.summary['mean_dice']:.4f} on {eval_data}")
    if release.registered_version:
        console.print(f"registered {register} version {release.registered_version}")
    seconds = result.seconds
    console.print(
        f"{result.frames_written} training frames ({result.pixels_kept:.1%} of their pixels kept); "
        f"{seconds['prepare']:.0f} s preparing, {seconds['train']:.0f} s training, {seconds['total']:.0f} s in all"
    )
